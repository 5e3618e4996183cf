"""`[[proxy]]` entries: the upstream registries `kura serve` caches (a pull-through mirror).

    [[proxy]]
    prefix = "docker.io"                         # names under docker.io/ in Kura; "" = the root mirror
    remote = "https://registry-1.docker.io"
    username = "me"                              # optional; else the serving user's Docker config.json
    password = "..."
    tag_ttl_seconds = 600                        # a tag is trusted this long before one HEAD revalidates it
    max_bytes = 50_000_000_000                   # 0: no cap; above it, least recently pulled content goes
    repositories = ["library/*", "bitnami/**"]   # optional globs on the upstream name
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ocispec.names import glob_to_regex, is_valid_name
from ocispec.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

DEFAULT_TAG_TTL_SECONDS = 600
_KEYS = {"prefix", "remote", "username", "password", "tag_ttl_seconds", "max_bytes", "repositories", "docker_hub"}


class ProxyConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Proxy:
    prefix: str
    remote: str
    """scheme://host[:port] of the upstream registry's API."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tag_ttl_seconds: int = DEFAULT_TAG_TTL_SECONDS
    max_bytes: int = 0
    repositories: tuple[str, ...] = ()
    docker_hub: bool = False
    """Single names mean `library/<name>`, as docker reads them."""
    _patterns: tuple[re.Pattern, ...] = field(default=(), repr=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.remote).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.remote).netloc

    @property
    def label(self) -> str:
        """How logs and errors name this proxy."""
        return f"{self.prefix or '(root)'} -> {self.remote}"

    @property
    def name(self) -> str:
        """How metrics and readiness checks name this proxy: its prefix."""
        return self.prefix or "(root)"

    def serves(self, upstream_name: str) -> bool:
        return not self._patterns or any(p.fullmatch(upstream_name) for p in self._patterns)

    def upstream_name(self, name: str) -> str:
        """The name upstream for `name` as a client wrote it after the prefix."""
        if self.docker_hub and "/" not in name:
            return f"library/{name}"
        return name

    def local_name(self, upstream_name: str) -> str:
        """Where the cache stores that repository in Kura."""
        return f"{self.prefix}/{upstream_name}" if self.prefix else upstream_name


def parse(entries: object) -> tuple[Proxy, ...]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ProxyConfigError("proxy must be an array of tables: [[proxy]]")
    proxies = [_parse_entry(entry, number) for number, entry in enumerate(entries, 1)]
    seen: set[str] = set()
    for proxy in proxies:
        if proxy.prefix in seen:
            raise ProxyConfigError(f"two [[proxy]] entries have the prefix {proxy.prefix!r}")
        seen.add(proxy.prefix)
    return tuple(proxies)


def _parse_entry(entry: dict, number: int) -> Proxy:
    where = f"[[proxy]] #{number}"
    unknown = set(entry) - _KEYS
    if unknown:
        raise ProxyConfigError(f"{where}: unknown option {sorted(unknown)[0]}")

    def typed(key: str, kind: type, default):
        value = entry.get(key, default)
        if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ProxyConfigError(f"{where}: {key} must be a {kind.__name__}")
        return value

    prefix = typed("prefix", str, "").strip("/")
    if prefix and not is_valid_name(prefix):
        raise ProxyConfigError(f"{where}: prefix {prefix!r} is not a repository name path "
                               "(lower-case components like docker.io or ghcr.io, no port)")
    remote = typed("remote", str, None)
    if remote is None:
        raise ProxyConfigError(f"{where}: remote is required (e.g. https://registry-1.docker.io)")
    parts = urlsplit(remote)
    if parts.username is not None or parts.password is not None:
        raise ProxyConfigError(f"{where}: remote must not carry credentials; set username and password")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
        raise ProxyConfigError(f"{where}: remote must be http(s)://host[:port], got {remote!r}")
    username, password = typed("username", str, None), typed("password", str, None)
    if (username is None) != (password is None):
        raise ProxyConfigError(f"{where}: username and password must be set together")
    ttl = typed("tag_ttl_seconds", int, DEFAULT_TAG_TTL_SECONDS)
    max_bytes = typed("max_bytes", int, 0)
    if ttl < 0 or max_bytes < 0:
        raise ProxyConfigError(f"{where}: tag_ttl_seconds and max_bytes must not be negative")
    globs = typed("repositories", list, [])
    if not all(isinstance(glob, str) and glob for glob in globs):
        raise ProxyConfigError(f"{where}: repositories must be a list of globs")
    hub = parts.hostname in DOCKER_HUB_ALIASES or prefix == DOCKER_HUB
    docker_hub = typed("docker_hub", bool, hub)
    return Proxy(prefix, f"{parts.scheme}://{parts.netloc}", username, password, ttl, max_bytes, tuple(globs),
                 docker_hub, tuple(glob_to_regex(glob) for glob in globs))
