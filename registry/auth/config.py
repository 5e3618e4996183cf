"""The `[auth]` section of the server configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .rules import ACTIONS, AccessRules, Rule

MODES = ("none", "htpasswd", "token")


class ConfigError(ValueError):
    """A bad [auth] section (registry.config re-raises it as its own ConfigError)."""


@dataclass(frozen=True)
class ExternalIssuer:
    """Trust tokens from another issuer instead of issuing our own."""
    realm: str
    service: str
    issuer: str
    certificate: Path | None = None  # PEM certificate(s) or public key(s)
    jwks: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    mode: str = "none"
    htpasswd: Path | None = None
    realm: str | None = None
    service: str = "kura"
    issuer: str = "kura"
    token_ttl_seconds: int = 300
    refresh_ttl_seconds: int = 30 * 24 * 3600
    algorithm: str = "ES256"
    signing_key: Path | None = None
    signing_certificate: Path | None = None
    login_attempts: int = 5
    login_window_seconds: int = 60
    min_password_length: int = 8
    trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})
    external: ExternalIssuer | None = None
    rules: AccessRules = AccessRules.default()

    def htpasswd_path(self, root: Path) -> Path:
        return self.htpasswd or root / "auth" / "htpasswd"

    def key_paths(self, root: Path) -> tuple[Path, Path]:
        return (self.signing_key or root / "auth" / "token-signing.key",
                self.signing_certificate or root / "auth" / "token-signing.crt")


_LISTS = {"trusted_proxies"}
_SIMPLE = {
    "mode": str, "htpasswd": str, "realm": str, "service": str, "issuer": str,
    "token_ttl_seconds": int, "refresh_ttl_seconds": int, "algorithm": str,
    "signing_key": str, "signing_certificate": str, "login_attempts": int, "login_window_seconds": int,
    "min_password_length": int,
}
_RULE_KEYS = {"repositories": list, "catalog": bool, "users": list, "groups": list, "anonymous": bool,
              "actions": list}


def parse(section: dict | None) -> AuthConfig:
    section = dict(section or {})
    values: dict = {}
    groups = section.pop("groups", {})
    rules = section.pop("rules", None)
    external = section.pop("external", None)
    for key in _LISTS & set(section):
        value = section.pop(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"auth.{key} must be a list of strings")
        values[key] = frozenset(value)
    for key, value in section.items():
        kind = _SIMPLE.get(key)
        if kind is None:
            raise ConfigError(f"unknown option auth.{key}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"auth.{key} must be a {kind.__name__}")
        values[key] = Path(value) if key in ("htpasswd", "signing_key", "signing_certificate") and value else value
        if values[key] == "":
            values[key] = None
    if values.get("mode", "none") not in MODES:
        raise ConfigError(f"auth.mode must be one of {', '.join(MODES)}")
    if values.get("algorithm", "ES256") not in ("ES256", "RS256"):
        raise ConfigError("auth.algorithm must be ES256 or RS256")
    for key in ("token_ttl_seconds", "refresh_ttl_seconds", "login_attempts", "login_window_seconds",
                "min_password_length"):
        if key in values and values[key] <= 0:
            raise ConfigError(f"auth.{key} must be positive")
    mode = values.get("mode")
    if mode is None and (section or rules is not None or groups or external is not None):
        raise ConfigError("[auth] is set but auth.mode is not: set mode = \"token\", \"htpasswd\" or \"none\"")
    if external is not None:
        if mode != "token":
            raise ConfigError("auth.external only applies with mode = \"token\"")
        if rules is not None or groups:
            raise ConfigError("with auth.external the external issuer decides access; "
                              "auth.rules and auth.groups would be ignored, so remove them")
        values["external"] = _parse_external(external)
    if rules is not None or groups:
        values["rules"] = AccessRules(tuple(_parse_rule(r, i) for i, r in enumerate(rules or [])),
                                      _parse_groups(groups))
    return AuthConfig(**values)


def _parse_groups(groups) -> dict[str, tuple[str, ...]]:
    if not isinstance(groups, dict) or not all(
            isinstance(m, list) and all(isinstance(u, str) for u in m) for m in groups.values()):
        raise ConfigError("auth.groups must map group names to lists of user names")
    return {name: tuple(members) for name, members in groups.items()}


def _parse_rule(rule, index: int) -> Rule:
    where = f"auth.rules[{index}]"
    if not isinstance(rule, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in rule.items():
        kind = _RULE_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: unknown key {key!r}")
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}.{key} must be a {'list of strings' if kind is list else kind.__name__}")
    if not rule.get("repositories") and not rule.get("catalog"):
        raise ConfigError(f"{where} must name repositories or set catalog = true")
    actions = set(rule.get("actions", []))
    unknown = actions - set(ACTIONS) - {"*"}
    if not actions or unknown:
        raise ConfigError(f"{where}.actions must be a non-empty list of pull, push, delete or *")
    if rule.get("catalog") and "*" not in actions:
        raise ConfigError(f"{where}: the catalog is granted with actions = [\"*\"]")
    if not (rule.get("users") or rule.get("groups") or rule.get("anonymous")):
        raise ConfigError(f"{where} applies to nobody: set users, groups or anonymous = true")
    return Rule.create(repositories=tuple(rule.get("repositories", ())), catalog=rule.get("catalog", False),
                       users=tuple(rule.get("users", ())), groups=tuple(rule.get("groups", ())),
                       anonymous=rule.get("anonymous", False), actions=frozenset(actions))


def _parse_external(table) -> ExternalIssuer:
    if not isinstance(table, dict):
        raise ConfigError("auth.external must be a table")
    unknown = set(table) - {"realm", "service", "issuer", "certificate", "jwks"}
    if unknown:
        raise ConfigError(f"unknown option auth.external.{sorted(unknown)[0]}")
    for key in ("realm", "service", "issuer"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise ConfigError(f"auth.external.{key} is required")
    if not table.get("certificate") and not table.get("jwks"):
        raise ConfigError("auth.external needs certificate or jwks to verify tokens")
    return ExternalIssuer(table["realm"], table["service"], table["issuer"],
                          Path(table["certificate"]) if table.get("certificate") else None,
                          Path(table["jwks"]) if table.get("jwks") else None)
