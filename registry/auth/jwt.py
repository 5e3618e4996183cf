"""Compact JWS (JWT) signing and verification with `cryptography`: ES256 and RS256 only.

Verification is strict: the algorithm comes from the verifier's key, never from the token
(so `alg: none` and HS256-signed-with-the-public-key tokens are refused), and the time,
audience and issuer claims are checked by `verify`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ocispec import strict_json

LEEWAY_SECONDS = 30


class TokenError(ValueError):
    """The token is malformed, badly signed, expired, or not meant for us."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise TokenError("malformed base64url") from None


def algorithm_for(key) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name != "secp256r1":
            raise ValueError("only P-256 EC keys are supported (ES256)")
        return "ES256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def libtrust_key_id(public_key) -> str:
    """The key ID Docker's libtrust (and so CNCF distribution) derives from a public key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))


def sign(claims: dict, private_key, *, kid: str | None = None, certificate: x509.Certificate | None = None) -> str:
    header = {"typ": "JWT", "alg": algorithm_for(private_key)}
    if kid:
        header["kid"] = kid
    if certificate is not None:
        header["x5c"] = [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()]
    signing_input = f"{b64url(json.dumps(header, separators=(',', ':')).encode())}." \
                    f"{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
    if header["alg"] == "ES256":
        r, s = decode_dss_signature(private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def decode_unverified(token: str) -> tuple[dict, dict, bytes, bytes]:
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("a JWT has three parts")
    try:
        # Strict: a hostile token (deep nesting, huge integers) is malformed, not a server error.
        header = strict_json.loads(b64url_decode(parts[0]))
        claims = strict_json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise TokenError("malformed JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("malformed JWT")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), b64url_decode(parts[2])


def verify_signature(token: str, public_keys: dict[str, object]) -> dict:
    """Check the signature against one of `public_keys` (by `kid`, else each in turn);
    returns the claims. The key's type decides the algorithm."""
    header, claims, signing_input, signature = decode_unverified(token)
    kid = header.get("kid")
    candidates = [public_keys[kid]] if kid in public_keys else list(public_keys.values())
    for key in candidates:
        expected = algorithm_for(key)
        if header.get("alg") != expected:
            continue
        try:
            if expected == "ES256":
                if len(signature) != 64:
                    raise InvalidSignature()
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            else:
                key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return claims
        except InvalidSignature:
            continue
    raise TokenError("signature does not verify with any trusted key")


def verify(token: str, public_keys: dict[str, object], *, audience: str, issuer: str,
           now: float | None = None) -> dict:
    claims = verify_signature(token, public_keys)
    now = time.time() if now is None else now
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat", 0))
    if not _finite(exp) or now > exp + LEEWAY_SECONDS:
        raise TokenError("token has expired")
    if not _finite(nbf) or now + LEEWAY_SECONDS < nbf:
        raise TokenError("token is not valid yet")
    aud = claims.get("aud")
    if audience not in (aud if isinstance(aud, list) else [aud]):
        raise TokenError("token is meant for another service")
    if claims.get("iss") != issuer:
        raise TokenError("token comes from an untrusted issuer")
    return claims


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
