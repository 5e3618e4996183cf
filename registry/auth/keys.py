"""The token signing key and its certificate (created on first start), and trusted keys."""

from __future__ import annotations

import datetime
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from storage.atomic import write_durably

from .jwt import algorithm_for, b64url_decode, libtrust_key_id


@dataclass(frozen=True)
class SigningKey:
    private_key: object
    certificate: x509.Certificate
    kid: str

    @property
    def public_keys(self) -> dict[str, object]:
        return {self.kid: self.private_key.public_key()}


def load_or_create(key_path: Path, cert_path: Path, algorithm: str, issuer: str) -> SigningKey:
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" \
            else rsa.generate_private_key(public_exponent=65537, key_size=3072)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        _create_once(key_path, pem, 0o600)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not cert_path.exists():
        _create_once(cert_path, _self_signed(key, issuer).public_bytes(serialization.Encoding.PEM), 0o644)
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{cert_path} does not belong to the key {key_path}")
    return SigningKey(key, certificate, libtrust_key_id(key.public_key()))


def _self_signed(key, issuer: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{issuer} token signing")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))


def _create_once(path: Path, data: bytes, mode: int) -> None:
    """Create `path` atomically unless it exists (two processes starting at once agree).
    An error names `path` and leaves no temp file behind."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_durably(fd, data)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def load_trusted_keys(certificate: Path | None, jwks: Path | None) -> dict[str, object]:
    """Public keys of an external issuer: from PEM certificates/public keys and/or a JWKS file."""
    keys: dict[str, object] = {}
    if certificate is not None:
        data = certificate.read_bytes()
        for cert in _pem_certificates(data):
            keys[libtrust_key_id(cert.public_key())] = cert.public_key()
        if b"PUBLIC KEY-----" in data:
            key = serialization.load_pem_public_key(data[data.index(b"-----BEGIN PUBLIC KEY"):])
            keys[libtrust_key_id(key)] = key
    if jwks is not None:
        for entry in json.loads(jwks.read_text()).get("keys", []):
            key = _jwk_public_key(entry)
            keys[entry.get("kid") or libtrust_key_id(key)] = key
    for kid, key in keys.items():
        try:
            algorithm_for(key)
        except ValueError as exc:
            raise ValueError(f"trusted key {kid}: {exc}") from None
    return keys


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return []
    return x509.load_pem_x509_certificates(data)


def _jwk_public_key(entry: dict):
    if entry.get("kty") == "EC" and entry.get("crv") == "P-256":
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(b64url_decode(entry["x"]), "big"),
                                                int.from_bytes(b64url_decode(entry["y"]), "big"), ec.SECP256R1())
        return numbers.public_key()
    if entry.get("kty") == "RSA":
        numbers = rsa.RSAPublicNumbers(int.from_bytes(b64url_decode(entry["e"]), "big"),
                                       int.from_bytes(b64url_decode(entry["n"]), "big"))
        return numbers.public_key()
    raise ValueError(f"unsupported JWK {entry.get('kty')}/{entry.get('crv')}")
