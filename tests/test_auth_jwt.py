"""JWT signing and verification, and every way of forging a token that must fail."""

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from registry.auth import jwt

NOW = 1_800_000_000


def claims(**changes):
    base = {"iss": "kura", "sub": "alice", "aud": "kura", "exp": NOW + 300, "nbf": NOW - 1, "iat": NOW,
            "jti": "x", "access": [{"type": "repository", "name": "app", "actions": ["pull"]}]}
    base.update(changes)
    return base


@pytest.fixture(params=["ES256", "RS256"])
def key(request):
    if request.param == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def verify(token, key, **kw):
    return jwt.verify(token, {"k": key.public_key()}, audience=kw.get("aud", "kura"), issuer=kw.get("iss", "kura"),
                      now=kw.get("now", NOW))


def test_round_trip(key):
    token = jwt.sign(claims(), key, kid="k")
    assert verify(token, key)["sub"] == "alice"
    header = json.loads(jwt.b64url_decode(token.split(".")[0]))
    assert header == {"typ": "JWT", "alg": jwt.algorithm_for(key), "kid": "k"}


def test_es256_signature_is_raw_r_s():
    key = ec.generate_private_key(ec.SECP256R1())
    assert len(jwt.b64url_decode(jwt.sign(claims(), key).split(".")[2])) == 64


def forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join([jwt.b64url(json.dumps(header).encode()), jwt.b64url(json.dumps(payload).encode()),
                     jwt.b64url(signature)])


def test_alg_none_refused(key):
    with pytest.raises(jwt.TokenError):
        verify(forge({"alg": "none", "typ": "JWT"}, claims()), key)


def test_hs256_with_public_key_as_secret_refused(key):
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{jwt.b64url(json.dumps(header).encode())}.{jwt.b64url(json.dumps(claims()).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(jwt.TokenError):
        verify(f"{signing_input}.{jwt.b64url(mac)}", key)


def test_wrong_key_refused(key):
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(jwt.TokenError):
        verify(jwt.sign(claims(), other, kid="k"), key)


@pytest.mark.parametrize("change, message", [
    ({"exp": NOW - 3600}, "expired"),
    ({"nbf": NOW + 3600}, "not valid yet"),
    ({"aud": "another-registry"}, "another service"),
    ({"iss": "evil"}, "untrusted issuer"),
    ({"exp": None}, "expired"),
])
def test_claims_checked(key, change, message):
    with pytest.raises(jwt.TokenError, match=message):
        verify(jwt.sign(claims(**change), key), key)


def test_audience_list_accepted(key):
    assert verify(jwt.sign(claims(aud=["x", "kura"]), key), key)


def test_tampered_and_truncated_refused(key):
    token = jwt.sign(claims(), key)
    head, payload, signature = token.split(".")
    evil = jwt.b64url(json.dumps(claims(access=[{"type": "repository", "name": "*", "actions": ["*"]}])).encode())
    for bad in (f"{head}.{evil}.{signature}", f"{head}.{payload}.{signature[:-6]}", f"{head}.{payload}.",
                f"{head}.{payload}", "garbage", f"{head}.{payload}.{signature}.x"):
        with pytest.raises(jwt.TokenError):
            verify(bad, key)


def test_libtrust_key_id_format(key):
    kid = jwt.libtrust_key_id(key.public_key())
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 and set(g) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for g in groups)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert kid.replace(":", "") == base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()


def test_real_clock_default(key):
    token = jwt.sign(claims(exp=int(time.time()) + 60, nbf=int(time.time()) - 1), key)
    assert jwt.verify(token, {"k": key.public_key()}, audience="kura", issuer="kura")


@pytest.mark.parametrize("part", [
    b"[" * 3000 + b"]" * 3000,                 # deeper than the recursion limit
    b'{"alg": ' + b"1" * 5000 + b"}",           # past int()'s digit limit
    b'{"alg": "ES256", "x": NaN}',
    b"\xef\xbb\xbf" + b'{"alg": "ES256"}',
])
def test_hostile_json_is_a_token_error(key, part):
    good = jwt.sign(claims(), key, kid="k").split(".")
    for token in (f"{jwt.b64url(part)}.{good[1]}.{good[2]}", f"{good[0]}.{jwt.b64url(part)}.{good[2]}"):
        with pytest.raises(jwt.TokenError):
            verify(token, key)
