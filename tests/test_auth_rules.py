"""Access rules and the [auth] config section."""

import pytest

from registry.auth.config import ConfigError, parse
from registry.auth.rules import AccessRules, glob_to_regex


def test_globs():
    assert glob_to_regex("library/*").fullmatch("library/redis")
    assert not glob_to_regex("library/*").fullmatch("library/a/b")
    assert glob_to_regex("team/**").fullmatch("team/a/b/c")
    assert not glob_to_regex("team/**").fullmatch("teamx/a")
    assert glob_to_regex("a?c").fullmatch("abc") and not glob_to_regex("a.c").fullmatch("abc")


@pytest.fixture
def rules():
    return parse({
        "mode": "token",
        "groups": {"team": ["alice", "bob"]},
        "rules": [
            {"repositories": ["team/**"], "groups": ["team"], "actions": ["pull", "push"]},
            {"repositories": ["team/**"], "users": ["alice"], "actions": ["delete"]},
            {"repositories": ["public/*"], "anonymous": True, "actions": ["pull"]},
            {"repositories": ["public/*"], "users": ["carol"], "actions": ["*"]},
            {"catalog": True, "users": ["alice"], "actions": ["*"]},
        ],
    }).rules


def test_grants_add_up(rules):
    assert rules.allowed("alice", "repository", "team/app", {"pull", "push", "delete"}) == {"pull", "push", "delete"}
    assert rules.allowed("bob", "repository", "team/app", {"pull", "push", "delete"}) == {"pull", "push"}
    assert rules.allowed("carol", "repository", "team/app", {"pull"}) == set()
    assert rules.allowed("carol", "repository", "public/x", {"pull", "push", "delete"}) == {"pull", "push", "delete"}


def test_anonymous(rules):
    assert rules.allowed(None, "repository", "public/x", {"pull", "push"}) == {"pull"}
    assert rules.allowed(None, "repository", "team/app", {"pull"}) == set()
    assert rules.allowed("bob", "repository", "public/x", {"pull"}) == {"pull"}  # anonymous rules cover everyone


def test_catalog(rules):
    assert rules.allowed("alice", "registry", "catalog", {"*"}) == {"*"}
    assert rules.allowed("bob", "registry", "catalog", {"*"}) == set()


def test_default_rules():
    rules = AccessRules.default()
    assert rules.allowed("anyone", "repository", "a/b", {"pull", "push", "delete"}) == {"pull", "push", "delete"}
    assert rules.allowed(None, "repository", "a/b", {"pull"}) == set()
    assert parse({}).mode == "none"


@pytest.mark.parametrize("section, message", [
    ({"mode": "ldap"}, "auth.mode"),
    ({"mode": "token", "bogus": 1}, "unknown option auth.bogus"),
    ({"mode": "token", "rules": [{"repositories": ["x"], "users": ["a"], "actions": ["fly"]}]}, "actions"),
    ({"mode": "token", "rules": [{"repositories": ["x"], "actions": ["pull"]}]}, "applies to nobody"),
    ({"mode": "token", "rules": [{"users": ["a"], "actions": ["pull"]}]}, "repositories or set catalog"),
    ({"mode": "token", "rules": [{"repositories": "x", "users": ["a"], "actions": ["pull"]}]}, "list of strings"),
    ({"mode": "token", "groups": {"team": "alice"}}, "auth.groups"),
    ({"mode": "token", "external": {"realm": "https://x/token", "service": "s", "issuer": "i"}},
     "certificate or jwks"),
    ({"mode": "token", "algorithm": "HS256"}, "ES256 or RS256"),
    # Settings that would silently fail open or be ignored:
    ({"rules": [{"repositories": ["x"], "users": ["a"], "actions": ["pull"]}]}, "auth.mode is not"),
    ({"mode": "htpasswd", "external": {"realm": "r", "service": "s", "issuer": "i", "certificate": "c"}},
     "only applies with mode"),
    ({"mode": "token", "external": {"realm": "r", "service": "s", "issuer": "i", "certificate": "c"},
      "rules": [{"repositories": ["x"], "users": ["a"], "actions": ["pull"]}]}, "external issuer decides"),
    ({"mode": "token", "rules": [{"catalog": True, "users": ["a"], "actions": ["pull"]}]}, "catalog is granted"),
    ({"mode": "token", "trusted_proxies": "127.0.0.1"}, "list of strings"),
])
def test_invalid_sections(section, message):
    with pytest.raises(ConfigError, match=message):
        parse(section)


def test_trusted_keys_from_certificate_and_jwks(tmp_path):
    import json

    from cryptography.hazmat.primitives.asymmetric import ec

    from registry.auth import jwt
    from registry.auth.keys import load_or_create, load_trusted_keys

    signing = load_or_create(tmp_path / "k.pem", tmp_path / "c.pem", "ES256", "kura")
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    again = load_or_create(tmp_path / "k.pem", tmp_path / "c.pem", "ES256", "kura")
    assert again.kid == signing.kid  # created once, then reused
    from_cert = load_trusted_keys(tmp_path / "c.pem", None)
    assert list(from_cert) == [signing.kid]

    other = ec.generate_private_key(ec.SECP256R1())
    numbers = other.public_key().public_numbers()
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "other-key",
                      "x": jwt.b64url(numbers.x.to_bytes(32, "big")), "y": jwt.b64url(numbers.y.to_bytes(32, "big"))}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    keys = load_trusted_keys(None, tmp_path / "jwks.json")
    token = jwt.sign({"iss": "i", "aud": "s", "exp": 2_000_000_000}, other, kid="other-key")
    assert jwt.verify(token, keys, audience="s", issuer="i", now=1_900_000_000)["iss"] == "i"
