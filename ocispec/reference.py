"""Docker image references and their normalisation (`redis` -> `docker.io/library/redis:latest`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .digest import Digest, InvalidDigest
from .names import NAME_PATTERN, TAG_PATTERN

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")


class InvalidReference(ValueError):
    pass


def _looks_like_host(component: str) -> bool:
    """Whether a reference's first component is a registry host, as docker decides it."""
    return "." in component or ":" in component or component == "localhost" or component != component.lower()


def names_registry(text: str) -> bool:
    """Whether the user wrote a registry host (`localhost:5000/x`, `docker.io/redis`) rather
    than a short name (`redis`, `me/app:1`) that normalisation puts on Docker Hub."""
    first, sep, _ = text.partition("@")[0].partition("/")
    return bool(sep) and _looks_like_host(first)


@dataclass(frozen=True)
class Reference:
    domain: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse and normalise like `docker pull` does."""
        original = text
        if not text or text != text.strip():
            raise InvalidReference(f"invalid reference {original!r}")
        digest = None
        if "@" in text:
            text, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigest as exc:
                raise InvalidReference(f"invalid reference {original!r}: {exc}") from None
        tag = None
        last_slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > last_slash:
            text, tag = text[:colon], text[colon + 1:]
            if not TAG_PATTERN.fullmatch(tag):
                raise InvalidReference(f"invalid tag {tag!r} in {original!r}")
        first, sep, rest = text.partition("/")
        if sep and _looks_like_host(first):
            if not _DOMAIN.fullmatch(first):
                raise InvalidReference(f"invalid registry host {first!r} in {original!r}")
            domain, repository = first, rest
        else:
            domain, repository = DOCKER_HUB, text
        if domain in DOCKER_HUB_ALIASES:
            domain = DOCKER_HUB
            if "/" not in repository:
                repository = f"library/{repository}"
        if repository != repository.lower() and NAME_PATTERN.fullmatch(repository.lower()):
            raise InvalidReference(f"repository name must be lowercase: {original!r}")
        if not NAME_PATTERN.fullmatch(repository):
            raise InvalidReference(f"invalid repository name {repository!r} in {original!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, repository, tag, digest)

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes in `/v2/<name>/manifests/<reference>`: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else self.tag

    def with_tag(self, tag: str | None, digest: Digest | None = None) -> "Reference":
        return Reference(self.domain, self.repository, tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
