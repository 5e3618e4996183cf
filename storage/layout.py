"""The on-disk layout of the filesystem driver: the one place that builds paths.

    <root>/
      blobs/<alg>/<hex[:2]>/<hex>                  blob content, written once, shared by all repositories
      repositories/<name>/                          <name> may have several `/`-separated components
        _layers/<alg>/<hex>                          the blob is part of this repository (holds its digest)
        _manifests/revisions/<alg>/<hex>             a manifest of this repository: {"digest", "mediaType"}
        _manifests/tags/<tag>                        the digest the tag points at
        _referrers/<alg>/<subject hex>/<alg>-<hex>   descriptor of a manifest whose `subject` is that digest
        _cache/<key>                                 the pull-through cache's records for a repository it
                                                     fills (registry/proxy/): when a tag was last checked
                                                     upstream, when a manifest was last pulled
      uploads/<uuid>/info                            {"repository", "started_at", "owner"}: the session exists
      uploads/<uuid>/data                            bytes received so far (its size is the session offset)
      upload-index/owner/<key>/<uuid>                the open sessions of one owner (key: sha256 of the name,
                                                     or `anonymous`); flock()ed while counted and added to
      upload-index/repository/<sha256 of name>/<uuid>  the same per repository
      tmp/                                           files being written, renamed into place once fsynced
      locks/<sha256 of name>                         flock()ed while a repository's manifests or tags change
      usage/<ledger key>/state                       {"bytes", "seq"}: what one quota namespace stores (a cache,
                                                     recounted at start-up; storage/usage.py)
      usage/<ledger key>/lock                        flock()ed while the ledger is checked or changed
      usage/<ledger key>/blobs/<alg>/<hex>           "<size> <seq>": the blob is counted (seq: when last charged)
      locks/gc                                       the reference guard: flock()ed shared by every operation that
                                                     makes something refer to stored content, exclusive by a
                                                     collection while it deletes
      locks/gc-turnstile                             flock()ed on the way in to the guard, and by a collection for
                                                     as long as it wants or holds it, so pushes cannot starve it
      locks/gc-run                                   flock()ed for a whole garbage collection: one at a time
      gc/marking                                     exists while a collection runs: {"id", "started_at"}
      gc/journal                                     while it exists: `m <digest>` / `b <digest>` lines appended by
                                                     every guard holder, for the referenced manifests and blobs
      gc/last                                        when the last collection ended (a Unix time)
      outbox/<name>/pending/<key>                    a record waiting in a durable queue (event notifications,
                                                     one outbox per endpoint; key: time written, then random)
      outbox/<name>/failed/<key>                     a record given up on (kept for a person to look at)
      outbox/<name>/lock                             flock()ed by the process working through the outbox

Repository name components always start with [a-z0-9], so they never collide with the
`_`-prefixed directories. Every function re-validates what it is handed, so no string from
a request can become a path without matching the spec's grammar first.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
from pathlib import Path

from ocispec.digest import Digest
from ocispec.names import is_valid_name, is_valid_tag

from .driver import is_valid_outbox_key, is_valid_outbox_name

_LEDGER_KEY = re.compile(r"[0-9a-f]{64}")
_CACHE_RECORD_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
REPOSITORY_PATHS_KEPT = 4096
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_valid_upload_id(uuid: str) -> bool:
    return _UUID.fullmatch(uuid) is not None


def is_valid_cache_record_key(key: str) -> bool:
    return _CACHE_RECORD_KEY.fullmatch(key) is not None


def is_valid_ledger_key(key: str) -> bool:
    return _LEDGER_KEY.fullmatch(key) is not None


class Layout:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.repositories = self.root / "repositories"
        self.uploads = self.root / "uploads"
        self.upload_index = self.root / "upload-index"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.usage = self.root / "usage"
        self.gc = self.root / "gc"
        self.gc_guard = self.locks / "gc"
        self.gc_turnstile = self.locks / "gc-turnstile"
        self.gc_run = self.locks / "gc-run"
        self.gc_marker = self.gc / "marking"
        self.gc_journal = self.gc / "journal"
        self.gc_last = self.gc / "last"
        self.outboxes = self.root / "outbox"
        # Names checked and joined already (validating and joining cost more than the read
        # of a tag file that follows).
        self._repository_paths: dict[str, Path] = {}

    def blob(self, digest: Digest) -> Path:
        _check_digest(digest)
        return self.blobs / digest.algorithm / digest.encoded[:2] / digest.encoded

    def repository(self, name: str) -> Path:
        path = self._repository_paths.get(name)
        if path is None:
            if not is_valid_name(name):
                raise ValueError(f"invalid repository name {name!r}")
            if len(self._repository_paths) >= REPOSITORY_PATHS_KEPT:
                self._repository_paths.clear()
            path = self._repository_paths[name] = self.repositories.joinpath(*name.split("/"))
        return path

    def repository_lock(self, name: str) -> Path:
        self.repository(name)  # validates
        return self.locks / hashlib.sha256(name.encode()).hexdigest()

    def layer_link(self, name: str, digest: Digest) -> Path:
        _check_digest(digest)
        return self.repository(name) / "_layers" / digest.algorithm / digest.encoded

    def revisions(self, name: str) -> Path:
        return self.repository(name) / "_manifests" / "revisions"

    def revision_link(self, name: str, digest: Digest) -> Path:
        _check_digest(digest)
        return self.revisions(name) / digest.algorithm / digest.encoded

    def tags(self, name: str) -> Path:
        return self.repository(name) / "_manifests" / "tags"

    def tag(self, name: str, tag: str) -> Path:
        if not is_valid_tag(tag):
            raise ValueError(f"invalid tag {tag!r}")
        return self.tags(name) / tag

    def referrers(self, name: str, subject: Digest) -> Path:
        _check_digest(subject)
        return self.repository(name) / "_referrers" / subject.algorithm / subject.encoded

    def referrer(self, name: str, subject: Digest, referrer: Digest) -> Path:
        _check_digest(referrer)
        return self.referrers(name, subject) / f"{referrer.algorithm}-{referrer.encoded}"

    def cache_records(self, name: str) -> Path:
        return self.repository(name) / "_cache"

    def cache_record(self, name: str, key: str) -> Path:
        if not is_valid_cache_record_key(key):
            raise ValueError(f"invalid cache record key {key!r}")
        return self.cache_records(name) / key

    def outbox(self, name: str) -> Path:
        if not is_valid_outbox_name(name):
            raise ValueError(f"invalid outbox name {name!r}")
        return self.outboxes / name

    def outbox_record(self, name: str, key: str, folder: str = "pending") -> Path:
        if not is_valid_outbox_key(key):
            raise ValueError(f"invalid outbox record key {key!r}")
        return self.outbox(name) / folder / key

    def usage_ledger(self, key: str) -> Path:
        if not is_valid_ledger_key(key):
            raise ValueError(f"invalid usage ledger key {key!r}")
        return self.usage / key

    def owner_uploads(self, owner: str | None) -> Path:
        key = "anonymous" if owner is None else hashlib.sha256(owner.encode()).hexdigest()
        return self.upload_index / "owner" / key

    def repository_uploads(self, name: str) -> Path:
        self.repository(name)  # validates
        return self.upload_index / "repository" / hashlib.sha256(name.encode()).hexdigest()

    def upload(self, uuid: str) -> Path:
        if not is_valid_upload_id(uuid):
            raise ValueError(f"invalid upload id {uuid!r}")
        return self.uploads / uuid


def _check_digest(digest: Digest) -> None:
    # Re-parse: a Digest built by hand must not smuggle `/` or `..` into a path.
    Digest.parse(str(digest))


def is_repository_dir(path: Path) -> bool:
    return (path / "_layers").is_dir() or (path / "_manifests").is_dir()


def walk_repositories(layout: Layout) -> list[str]:
    """Sorted names of every repository directory (never descending into `_` directories)."""
    names = []
    top = layout.repositories
    for current, dirs, _files in os.walk(top):
        path = Path(current)
        if path != top and is_repository_dir(path):
            names.append(path.relative_to(top).as_posix())
        dirs[:] = [d for d in dirs if not d.startswith("_")]
    return sorted(names)


class RepositoryWalk:
    """Repository names in sorted order, found a few at a time: directories are opened as
    the walk reaches them. (Sorted name order is not a depth-first order: `a-b` sorts between
    `a` and `a/c`. A heap of the names seen but not yet opened gives the order, since every
    name under a directory sorts after the directory's own.) Each directory is read once: its
    entries say both whether it is a repository and which directories lie under it."""

    def __init__(self, layout: Layout, after: str | None = None):
        self.layout = layout
        self.after = after
        self._pending: list[str] = []
        self._open("")

    def _open(self, prefix: str) -> bool:
        """Note the directories under `prefix`; whether `prefix` is a repository."""
        directory = self.layout.repositories / prefix if prefix else self.layout.repositories
        repository = False
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.is_dir():
                        continue
                    if entry.name.startswith("_"):
                        repository = repository or entry.name in ("_layers", "_manifests")
                        continue
                    name = f"{prefix}/{entry.name}" if prefix else entry.name
                    # Skip what sorts wholly before `after`: the name and every name under it.
                    if self.after is not None and name + "/" < self.after and not self.after.startswith(name + "/"):
                        continue
                    heapq.heappush(self._pending, name)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return repository

    def next_batch(self, count: int) -> list[str]:
        found: list[str] = []
        while self._pending and len(found) < count:
            name = heapq.heappop(self._pending)
            if self._open(name) and (self.after is None or name > self.after):
                found.append(name)
        return found
