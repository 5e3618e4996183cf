"""Content digests (`algorithm:hex`) as the OCI image-spec defines them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Registered algorithms and the exact shape of their encoded part.
_ENCODED = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
# The image-spec's general digest grammar; used to tell "malformed" from "unsupported".
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

CANONICAL_ALGORITHM = "sha256"


class InvalidDigest(ValueError):
    """The string is not a digest Kura can verify."""


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        if not isinstance(text, str) or not _GRAMMAR.fullmatch(text):
            raise InvalidDigest(f"malformed digest {text!r}")
        algorithm, _, encoded = text.partition(":")
        pattern = _ENCODED.get(algorithm)
        if pattern is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
        if not pattern.fullmatch(encoded):
            raise InvalidDigest(f"malformed {algorithm} digest {text!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = CANONICAL_ALGORITHM) -> "Digest":
        hasher = new_hasher(algorithm)
        hasher.update(data)
        return cls(algorithm, hasher.hexdigest())

    def new_hasher(self):
        return new_hasher(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


def new_hasher(algorithm: str):
    if algorithm not in _ENCODED:
        raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(algorithm)


def is_supported_algorithm(algorithm: str) -> bool:
    return algorithm in _ENCODED
