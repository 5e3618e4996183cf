"""`[[notifications]]` entries: the HTTP endpoints that receive the registry's events.

    [[notifications]]
    url = "https://hooks.example/registry"       # required: http or https
    headers = { Authorization = "Bearer ...", X-Env = ["prod", "eu"] }
    events = ["push", "delete"]                  # default: push, pull, delete, mount
    repositories = ["team/**"]                   # globs as in [[auth.rules]]; default: all
    timeout_seconds = 5                          # for one delivery
    backoff_seconds = 1                          # first wait after a failed delivery, doubling ...
    max_backoff_seconds = 300                    # ... up to this
    max_age_seconds = 604800                     # an event still undelivered after this goes to failed/
    name = "hooks"                               # its outbox's name; default: from the URL
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ocispec.names import glob_to_regex

ACTIONS = ("push", "pull", "delete", "mount")
_NUMBERS = {"timeout_seconds": 5.0, "backoff_seconds": 1.0, "max_backoff_seconds": 300.0,
            "max_age_seconds": 7 * 86400.0}
_KEYS = {"url", "name", "headers", "events", "repositories", *_NUMBERS}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NotifyConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    url: str
    name: str
    """Names its outbox (the queue in the store) and its log lines."""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold credentials
    events: frozenset[str] = frozenset(ACTIONS)
    repositories: tuple[str, ...] = ()
    timeout_seconds: float = _NUMBERS["timeout_seconds"]
    backoff_seconds: float = _NUMBERS["backoff_seconds"]
    max_backoff_seconds: float = _NUMBERS["max_backoff_seconds"]
    max_age_seconds: float = _NUMBERS["max_age_seconds"]
    _patterns: tuple[re.Pattern, ...] = field(default=(), repr=False, compare=False)

    def wants(self, action: str, repository: str) -> bool:
        return action in self.events and (not self._patterns
                                          or any(p.fullmatch(repository) for p in self._patterns))


def name_from_url(url: str) -> str:
    """host[_port] and a short hash of the whole URL: readable, and distinct per URL."""
    parts = urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", parts.hostname or "endpoint").strip("-.") or "endpoint"
    port = f"_{parts.port}" if parts.port else ""
    return f"{host[:80]}{port}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def parse(entries: object) -> tuple[Endpoint, ...]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise NotifyConfigError("notifications must be an array of tables: [[notifications]]")
    endpoints = [_endpoint(entry, f"notifications #{number}") for number, entry in enumerate(entries, 1)]
    seen: dict[str, int] = {}
    for number, endpoint in enumerate(endpoints, 1):
        if endpoint.name in seen:
            raise NotifyConfigError(f"notifications #{number}: name {endpoint.name!r} is taken by "
                                    f"notifications #{seen[endpoint.name]}; give each a distinct name")
        seen[endpoint.name] = number
    return tuple(endpoints)


def _endpoint(entry: dict, where: str) -> Endpoint:
    unknown = set(entry) - _KEYS
    if unknown:
        raise NotifyConfigError(f"{where}: unknown option {sorted(unknown)[0]}")
    url = entry.get("url")
    if not isinstance(url, str) or not url:
        raise NotifyConfigError(f"{where}: url is required (http:// or https://)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise NotifyConfigError(f"{where}: url {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise NotifyConfigError(f"{where}: url must be http:// or https:// with a host, got {url!r}")
    if parts.username or parts.password:
        raise NotifyConfigError(f"{where}: url must not carry credentials; use headers (Authorization)")
    name = entry.get("name", None)
    if name is None:
        name = name_from_url(url)
    elif not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NotifyConfigError(f"{where}: name must be letters, digits, '.', '_' or '-' (at most 128)")
    values = {}
    for key, default in _NUMBERS.items():
        value = entry.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise NotifyConfigError(f"{where}: {key} must be a positive number")
        values[key] = float(value)
    if values["max_backoff_seconds"] < values["backoff_seconds"]:
        raise NotifyConfigError(f"{where}: max_backoff_seconds must not be below backoff_seconds")
    events = entry.get("events", list(ACTIONS))
    if not isinstance(events, list) or not events or not all(e in ACTIONS for e in events):
        raise NotifyConfigError(f"{where}: events must be a non-empty list of {', '.join(ACTIONS)}")
    globs = entry.get("repositories", [])
    if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
        raise NotifyConfigError(f"{where}: repositories must be a list of globs")
    return Endpoint(url, name, _headers(entry.get("headers", {}), where), frozenset(events), tuple(globs),
                    _patterns=tuple(glob_to_regex(g) for g in globs), **values)


def _headers(table: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, dict):
        raise NotifyConfigError(f"{where}: headers must be a table: name = \"value\" or [\"value\", ...]")
    headers = []
    for name, value in table.items():
        if not _HEADER_NAME.fullmatch(name):
            raise NotifyConfigError(f"{where}: headers: {name!r} is not a header name")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str) or any(c in item for c in "\r\n\0"):
                raise NotifyConfigError(f"{where}: headers.{name} must be a string or a list of strings "
                                        "(one line each)")
            headers.append((name, item))
    return tuple(headers)
