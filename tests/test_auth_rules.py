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
    ({"bogus": 1}, "unknown option auth.bogus"),
    ({"rules": [{"repositories": ["x"], "users": ["a"], "actions": ["fly"]}]}, "actions"),
    ({"rules": [{"repositories": ["x"], "actions": ["pull"]}]}, "applies to nobody"),
    ({"rules": [{"users": ["a"], "actions": ["pull"]}]}, "repositories or set catalog"),
    ({"rules": [{"repositories": "x", "users": ["a"], "actions": ["pull"]}]}, "list of strings"),
    ({"groups": {"team": "alice"}}, "auth.groups"),
    ({"external": {"realm": "https://x/token", "service": "s", "issuer": "i"}}, "certificate or jwks"),
    ({"algorithm": "HS256"}, "ES256 or RS256"),
])
def test_invalid_sections(section, message):
    with pytest.raises(ConfigError, match=message):
        parse(section)
