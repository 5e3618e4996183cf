"""Where to fetch a reference from, as containers-registries.conf(5) (v2 TOML) says.

    [[registry]]
    prefix = "docker.io"            # which references this entry is for (default: location)
    location = "mirror.local:5000"  # where they really live (the prefix is rewritten to it)
    insecure = true                 # plain HTTP (or TLS without verification) allowed
    blocked = false                 # refuse to pull
    [[registry.mirror]]
    location = "cache.local/dockerhub"
    insecure = true

The same file that points skopeo or podman at a mirror points Kura there.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ocispec.reference import DOCKER_HUB, DOCKER_HUB_API, Reference


class RegistriesConfError(ValueError):
    pass


class Blocked(RegistriesConfError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """A place to ask: `host` (host[:port]) and the repository path there."""
    host: str
    repository: str
    insecure: bool = False

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def plain_http_allowed(self) -> bool:
        hostname = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host.split("]")[0] + "]"
        return self.insecure or hostname in ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class _Entry:
    prefix: str
    location: str
    insecure: bool
    blocked: bool
    mirrors: tuple[tuple[str, bool], ...] = ()


@dataclass
class Registries:
    entries: list[_Entry] = field(default_factory=list)
    source: Path | None = None

    @classmethod
    def load(cls, explicit: Path | None = None) -> "Registries":
        for candidate in _candidates(explicit):
            if candidate.is_file():
                return cls.parse(candidate.read_text(), candidate)
            if candidate == explicit:
                raise RegistriesConfError(f"{explicit}: no such file")
        return cls()

    @classmethod
    def parse(cls, text: str, source: Path | None = None) -> "Registries":
        where = str(source or "registries.conf")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RegistriesConfError(f"{where}: {exc}") from None
        entries = []
        for i, table in enumerate(doc.get("registry", [])):
            location = table.get("location", "")
            prefix = table.get("prefix") or location
            if not prefix:
                raise RegistriesConfError(f"{where}: [[registry]] #{i + 1} needs a prefix or a location")
            mirrors = tuple((m["location"], bool(m.get("insecure", False))) for m in table.get("mirror", [])
                            if m.get("location"))
            entries.append(_Entry(_normalise_prefix(prefix), location or prefix, bool(table.get("insecure", False)),
                                  bool(table.get("blocked", False)), mirrors))
        return cls(entries, source)

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """Mirrors first, then the (possibly rewritten) primary location."""
        name = ref.name
        matches = [e for e in self.entries if name == e.prefix or name.startswith(e.prefix + "/")]
        if not matches:
            return [Endpoint(ref.domain, ref.repository)]
        entry = max(matches, key=lambda e: len(e.prefix))
        if entry.blocked:
            raise Blocked(f"pulling from {entry.prefix} is blocked by {self.source or 'registries.conf'}")
        rest = name[len(entry.prefix):]
        endpoints = [_endpoint(location + rest, insecure) for location, insecure in entry.mirrors]
        endpoints.append(_endpoint(entry.location + rest, entry.insecure))
        return endpoints


def _normalise_prefix(prefix: str) -> str:
    for alias in ("index.docker.io", "registry-1.docker.io"):
        if prefix == alias or prefix.startswith(alias + "/"):
            return DOCKER_HUB + prefix[len(alias):]
    return prefix


def _endpoint(location: str, insecure: bool) -> Endpoint:
    host, _, repository = location.partition("/")
    return Endpoint(host, repository, insecure)


def _candidates(explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    out = []
    if os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        out.append(Path(os.environ["CONTAINERS_REGISTRIES_CONF"]))
    out.append(Path.home() / ".config" / "containers" / "registries.conf")
    out.append(Path("/etc/containers/registries.conf"))
    return out
