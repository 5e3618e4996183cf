"""The storage driver interface every handler talks to.

It speaks content, not HTTP and not paths: blobs by digest, per-repository links,
tags, referrers and resumable upload sessions. A driver must keep every mutation
atomic (old state or new state, never a torn one) and keep no request state in process
memory that another process serving the same store would need.
"""

from __future__ import annotations

import abc
import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Iterable

from ocispec.digest import Digest


@dataclass(frozen=True)
class BlobContent:
    digest: Digest
    size: int
    local_path: Path | None = None
    """Set when the bytes are a local file, so the server can sendfile() them."""


@dataclass(frozen=True)
class UploadInfo:
    uuid: str
    repository: str
    size: int
    started_at: float
    owner: str | None = None
    """Who started the session; only they may continue it."""


@dataclass(frozen=True)
class UploadQuota:
    """Caps on the open upload sessions of one owner and of one repository (0: no cap).
    Sessions idle since before `active_since` have expired (the purge removes them) and do
    not count, nor do finished or cancelled ones."""
    per_owner: int = 0
    per_repository: int = 0
    active_since: float = 0.0


@dataclass(frozen=True)
class ManifestLink:
    digest: Digest
    media_type: str


@dataclass(frozen=True)
class StoredBlob:
    digest: Digest
    size: int
    mtime: float
    """When the blob was stored; a driver may also refresh it whenever the blob is linked
    (the filesystem's does). A collection spares an unreferenced blob while this or any of
    its links (BlobLink.mtime, which link_blob always refreshes) is within the grace period."""


@dataclass(frozen=True)
class BlobLink:
    digest: Digest
    mtime: float
    """When the blob was (last) linked into the repository."""


class UsageLedger(abc.ABC):
    """The bytes one quota namespace stores, each blob counted once, kept exact across the
    processes serving a store: a running total checked and updated under a lock on every
    push, and the set of blobs it counts (so a blob already counted adds nothing).

    A push calls `charge` before it links a blob, then `confirm` once linked, or `refund`
    if it failed. A recount takes a `checkpoint`, counts what the namespace's repositories
    hold, and hands that to `replace`, which keeps whatever was charged or confirmed after the
    checkpoint (the walk may have missed it) and drops the rest (blobs no longer held)."""

    @abc.abstractmethod
    async def charge(self, digest: Digest, size: int, limit: int) -> int | None:
        """Count `digest` (`size` bytes) unless it is counted already (then None). Raises
        QuotaExceeded, counting nothing, when the total would pass `limit`. Returns a token
        for `refund`."""

    @abc.abstractmethod
    async def refund(self, digest: Digest, token: int) -> None:
        """Undo the `charge` that returned `token`, unless the blob was confirmed since."""

    @abc.abstractmethod
    async def confirm(self, digest: Digest, size: int) -> None:
        """`digest` is now linked in the namespace: make sure it is counted (again, if a
        recount dropped it while it was being linked)."""

    @abc.abstractmethod
    async def total(self) -> int | None:
        """Bytes counted; None when the ledger has never been counted."""

    @abc.abstractmethod
    async def checkpoint(self) -> int:
        """Mark the start of a recount (before the walk); pass the result to `replace`."""

    @abc.abstractmethod
    async def replace(self, counted: dict[Digest, int], checkpoint: int) -> int:
        """End a recount: count exactly the blobs of `counted` (digest -> size), plus those
        charged or confirmed after `checkpoint`. Returns the new total."""


@dataclass(frozen=True)
class Stamped:
    digest: Digest
    mtime: float
    """When the link or tag was last written."""


@dataclass
class RepositorySnapshot:
    """What a garbage collection needs of one repository, read entry by entry (not atomically)."""
    name: str
    tags: dict[str, Stamped]
    revisions: dict[Digest, float]
    """Manifest links -> when each was last written."""
    layers: dict[Digest, float]
    """Blob links -> when each was last written or refreshed."""


class Collection(abc.ABC):
    """A garbage collection in progress (StorageDriver.collection). From its start to its end
    every reference noted under the reference guard (note_references) is journaled for it."""

    @abc.abstractmethod
    def exclusive(self) -> contextlib.AbstractAsyncContextManager:
        """Hold off every reference guard, in every process, for a short moment: the time to
        read the rest of the journal and delete. Raises RepositoryBusy after a long wait."""

    @abc.abstractmethod
    async def read_journal(self) -> tuple[set[Digest], set[Digest]]:
        """(manifests, blobs) noted since the previous call; complete up to now only when
        called under exclusive()."""


@dataclass(frozen=True)
class OutboxRecord:
    key: str
    """Sorts after the key of every record appended before it (same clock: see append_outbox)."""
    data: bytes


class OutboxLease:
    """Held by the one process (of all serving the store) that works through an outbox."""
    lost = False
    """True once another process may have taken it over (a driver whose lease expires)."""


_last_outbox_stamp = 0


def new_outbox_key() -> str:
    """A record's key: the time of writing first (in nanoseconds, never twice the same nor
    going back within a process), so that keys sort oldest first; then a random part."""
    global _last_outbox_stamp
    stamp = _last_outbox_stamp = max(time.time_ns(), _last_outbox_stamp + 1)
    return f"{stamp:020d}-{uuid.uuid4().hex}"


def is_valid_outbox_name(name: str) -> bool:
    return _OUTBOX_NAME.fullmatch(name) is not None


def is_valid_outbox_key(key: str) -> bool:
    return _OUTBOX_KEY.fullmatch(key) is not None


_OUTBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OUTBOX_KEY = re.compile(r"[0-9]{20}-[0-9a-f]{32}")


class StorageDriver(abc.ABC):
    # Whether a manifest push stores the content (and checks what it names) before it takes the
    # repository's lock rather than under it: worth a second round of checks where a write
    # costs much more than a check (storage/manifests.py).
    stores_manifests_before_locking = False
    # -- blobs (content-addressed, shared by all repositories) ------------------------
    @abc.abstractmethod
    async def stat_blob(self, digest: Digest) -> BlobContent | None: ...

    @abc.abstractmethod
    def read_blob(self, digest: Digest, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream `length` bytes of a blob from `start`; raises BlobNotFound."""

    @abc.abstractmethod
    async def read_small_blob(self, digest: Digest, limit: int) -> bytes:
        """Whole content of a blob no larger than `limit` (manifests); raises BlobNotFound."""

    @abc.abstractmethod
    async def put_small_blob(self, data: bytes, digest: Digest) -> None:
        """Store `data` under `digest`, which the caller has computed from it."""

    # -- repository membership ------------------------------------------------------
    @abc.abstractmethod
    async def link_blob(self, repository: str, digest: Digest) -> None: ...

    @abc.abstractmethod
    async def unlink_blob(self, repository: str, digest: Digest) -> bool: ...

    @abc.abstractmethod
    async def is_blob_linked(self, repository: str, digest: Digest) -> bool: ...

    async def stat_linked_blob(self, repository: str, digest: Digest, *, recent_ok: bool = False) -> BlobContent | None:
        """The blob, if it is stored and linked into `repository` (a driver may answer both
        with one request). `recent_ok`: an answer a few seconds old will do (a pull's HEAD or
        GET, never the checks of a push), which a driver may serve from memory."""
        if not await self.is_blob_linked(repository, digest):
            return None
        return await self.stat_blob(digest)

    @abc.abstractmethod
    async def repositories_linking_blob(self, digest: Digest) -> list[str]: ...

    @abc.abstractmethod
    async def link_manifest(self, repository: str, digest: Digest, media_type: str) -> None: ...

    @abc.abstractmethod
    async def get_manifest_link(self, repository: str, digest: Digest) -> ManifestLink | None: ...

    @abc.abstractmethod
    async def unlink_manifest(self, repository: str, digest: Digest) -> bool: ...

    @abc.abstractmethod
    async def list_manifests(self, repository: str) -> list[ManifestLink]: ...

    @contextlib.asynccontextmanager
    async def staged_manifest_links(self, repository: str, digest: Digest, media_type: str,
                                    referrer: tuple[Digest, dict] | None, tags: tuple[str, ...]):
        """The writes that make a pushed manifest visible: its revision link, then its referrer
        entry (`referrer`: subject and descriptor), then its tags. Entered before the
        repository's lock is taken (a driver may prepare the writes there), it yields the
        coroutine function that makes them, called under the lock; the writes are durable
        when the context is left, after the lock (a driver may finish them there)."""
        async def install() -> None:
            await self.link_manifest(repository, digest, media_type)
            if referrer is not None:
                await self.add_referrer(repository, referrer[0], referrer[1])
            for tag in tags:
                await self.set_tag(repository, tag, digest)

        yield install

    # -- tags -----------------------------------------------------------------------
    @abc.abstractmethod
    async def set_tag(self, repository: str, tag: str, digest: Digest) -> None: ...

    @abc.abstractmethod
    async def resolve_tag(self, repository: str, tag: str) -> Digest | None: ...

    @abc.abstractmethod
    async def delete_tag(self, repository: str, tag: str) -> bool: ...

    @abc.abstractmethod
    async def list_tags(self, repository: str) -> list[str]:
        """Sorted tags; empty when the repository has none."""

    async def stamp_tags(self, repository: str, tags: Iterable[str]) -> dict[str, Stamped]:
        """The digest and last-written time of each of `tags` that exists (one page of a
        listing: a driver should not read the others)."""
        wanted = set(tags)
        snapshot = await self.snapshot_repository(repository)
        return {tag: stamp for tag, stamp in snapshot.tags.items() if tag in wanted}

    # -- referrers ------------------------------------------------------------------
    @abc.abstractmethod
    async def add_referrer(self, repository: str, subject: Digest, descriptor: dict) -> None: ...

    @abc.abstractmethod
    async def remove_referrer(self, repository: str, subject: Digest, referrer: Digest) -> None: ...

    @abc.abstractmethod
    async def list_referrers(self, repository: str, subject: Digest) -> list[Digest]:
        """Sorted digests of the manifests recorded as referring to `subject`."""

    @abc.abstractmethod
    async def read_referrer(self, repository: str, subject: Digest, referrer: Digest) -> dict | None: ...

    @abc.abstractmethod
    async def list_referrer_subjects(self, repository: str) -> list[Digest]:
        """Sorted digests of the subjects with at least one referrer entry in `repository`
        (whether or not a manifest with that digest exists): what fsck walks."""

    # -- repositories ---------------------------------------------------------------
    @abc.abstractmethod
    def repository_lock(self, repository: str) -> contextlib.AbstractAsyncContextManager:
        """Held while a repository's manifests, tags or referrers change, across processes.
        Raises RepositoryBusy when it cannot be had in reasonable time."""

    @abc.abstractmethod
    async def repository_exists(self, repository: str) -> bool: ...

    @abc.abstractmethod
    async def list_repositories(self) -> list[str]:
        """Sorted names of every repository with at least one blob or manifest link."""

    async def iter_repositories(self, after: str | None = None) -> AsyncIterator[str]:
        """list_repositories' names after `after`, in order; a driver may find them as they
        are asked for (a catalog's page needs the first few of many)."""
        for name in await self.list_repositories():
            if after is None or name > after:
                yield name

    # -- upload sessions ------------------------------------------------------------
    @abc.abstractmethod
    async def create_upload(self, repository: str, owner: str | None = None,
                            quota: UploadQuota | None = None) -> UploadInfo:
        """Start a session. Raises TooManyUploads when `quota` would be exceeded, checked
        so that several processes serving the store together never exceed it."""

    @abc.abstractmethod
    async def get_upload(self, uuid: str) -> UploadInfo:
        """Raises UploadNotFound (also for malformed ids)."""

    @abc.abstractmethod
    async def append_upload(self, uuid: str, chunks: AsyncIterable[bytes], *,
                            offset: int | None = None, length: int | None = None,
                            max_size: int | None = None) -> UploadInfo:
        """Append a chunk. With `offset`, it must equal the session's size (RangeMismatch);
        with `length`, exactly that many bytes must arrive (SizeMismatch). On any error
        the session is left as it was before the call. An empty item of `chunks` (here and
        in put_blob) means the source is about to wait: write out anything held in memory."""

    @abc.abstractmethod
    async def put_blob(self, repository: str, digest: Digest, chunks: AsyncIterable[bytes], *,
                       length: int | None = None, max_size: int | None = None) -> BlobContent:
        """Store a whole blob in one go (no session), verified against `digest`, and link it
        into `repository`. On any error, nothing is stored."""

    @abc.abstractmethod
    async def commit_upload(self, uuid: str, digest: Digest, *, size: int | None = None) -> BlobContent:
        """Verify the session's content against `digest` (and `size`), store it as a blob,
        link it into the session's repository and end the session. On DigestMismatch
        or SizeMismatch nothing is stored and the session ends."""

    @abc.abstractmethod
    async def cancel_upload(self, uuid: str) -> None: ...

    @abc.abstractmethod
    async def list_uploads(self) -> list[str]:
        """Sorted ids of every upload session in the store, in progress or abandoned (a
        session being created or removed may be listed and then not be found)."""

    @abc.abstractmethod
    async def purge_uploads(self, older_than: float) -> int:
        """Remove sessions started before the `older_than` timestamp; returns how many."""

    # -- garbage collection (storage/gc.py) -------------------------------------------
    @abc.abstractmethod
    def reference_guard(self) -> contextlib.AbstractAsyncContextManager:
        """Held (shared, across processes) by every operation that finds content stored and
        then makes something refer to it: a manifest push from its reference checks to its
        last link, a blob mount, the commit of a blob. A collection deletes only while no
        guard is held, so none of these can act on content it is deleting. Not re-entrant;
        taken before any repository_lock. Raises RepositoryBusy after a long wait."""

    @abc.abstractmethod
    async def note_references(self, *, manifests: Iterable[Digest] = (), blobs: Iterable[Digest] = ()) -> None:
        """Under reference_guard: tell a running collection (if any) that these are referenced
        now, so it keeps them (and, for manifests, what they reference)."""

    @abc.abstractmethod
    def collection(self) -> contextlib.AbstractAsyncContextManager[Collection | None]:
        """Run one garbage collection. Yields None at once when another one is running (in
        any process serving the store); else a Collection, journaling from its start, and a
        journal a crashed collector left is discarded first."""

    @abc.abstractmethod
    async def last_collection(self) -> float | None:
        """When the last collection ended (any process), None if there never was one."""

    @abc.abstractmethod
    def iter_blobs(self) -> AsyncIterator[StoredBlob]:
        """Every stored blob (manifests included), in no particular order."""

    @abc.abstractmethod
    async def snapshot_repository(self, repository: str) -> RepositorySnapshot: ...

    @abc.abstractmethod
    async def unlink_blobs(self, links: list[tuple[str, Digest]]) -> None:
        """Remove these (repository, blob) links; under Collection.exclusive()."""

    @abc.abstractmethod
    async def delete_blobs(self, digests: list[Digest]) -> None:
        """Delete these blobs, whose links the caller removed first; under Collection.exclusive()."""

    @abc.abstractmethod
    async def remove_repository_if_empty(self, repository: str) -> bool:
        """Remove a repository that has no manifest, tag or blob link left, so it leaves the
        catalog; False (and nothing removed) when it has any. Under Collection.exclusive()."""

    @abc.abstractmethod
    async def purge_temp(self, older_than: float) -> int:
        """Remove files being written that were last touched before `older_than`; how many."""

    # -- usage accounting and whole-repository removal ----------------------------------
    @abc.abstractmethod
    async def list_blob_links(self, repository: str) -> list[BlobLink]:
        """The blobs linked into `repository` (its layer links; manifests are separate)."""

    @abc.abstractmethod
    def usage_ledger(self, key: str) -> UsageLedger:
        """The usage ledger named `key` (64 hex digits), created empty on first use."""

    @abc.abstractmethod
    async def delete_repository(self, repository: str) -> bool:
        """Remove a repository's tags, then its referrer entries, then its manifest
        revisions, then its blob links and upload sessions, then its directory, so that a
        crash between any two steps leaves a consistent store (no tag or referrer naming a
        missing manifest). Blobs stay for the garbage collection. Call it under
        `repository_lock`. False when there is no such repository."""

    # -- the pull-through cache's bookkeeping (registry/proxy/) ------------------------
    @abc.abstractmethod
    async def read_cache_record(self, repository: str, key: str) -> bytes | None:
        """A small record the cache keeps for a repository (`key`: letters, digits, `._-`)."""

    @abc.abstractmethod
    async def write_cache_record(self, repository: str, key: str, data: bytes) -> None:
        """Replace a record atomically: a reader sees the old content or the new, never a torn one."""

    @abc.abstractmethod
    async def list_cache_records(self, repository: str) -> dict[str, bytes]:
        """Every record of a repository: key -> content."""

    @abc.abstractmethod
    async def delete_cache_record(self, repository: str, key: str) -> None: ...

    # -- outboxes: durable queues of small records (registry/notify/) -----------------------
    # `outbox` names one queue (letters, digits, `._-`); records are appended by any process
    # and worked through, oldest first, by the one holding the outbox's lease.
    @abc.abstractmethod
    async def append_outbox(self, outbox: str, data: bytes) -> str:
        """Store a record durably before returning its key (new_outbox_key: written later in this
        process, or later by the clock in another, sorts later)."""

    @abc.abstractmethod
    async def pending_outbox(self, outbox: str, limit: int) -> list[OutboxRecord]:
        """The oldest `limit` records of the outbox, oldest first."""

    @abc.abstractmethod
    async def remove_outbox(self, outbox: str, keys: list[str]) -> None:
        """Remove these records (done with); keys already gone are ignored. Need not be durable
        at once: a removal a crash undoes has the records worked through again."""

    @abc.abstractmethod
    async def fail_outbox(self, outbox: str, key: str) -> None:
        """Move a record out of the queue to the outbox's failed ones, kept for a person to see."""

    @abc.abstractmethod
    async def failed_outbox(self, outbox: str) -> list[OutboxRecord]:
        """The failed records of the outbox, oldest first."""

    @abc.abstractmethod
    def outbox_lease(self, outbox: str) -> contextlib.AbstractAsyncContextManager[OutboxLease | None]:
        """Held while this process works through the outbox: yields None at once when another
        process (or another driver of this one) holds it. The holder stops once `lost`."""

    async def blob_url(self, digest: Digest) -> str | None:
        """A URL a client may fetch the blob from directly (a presigned object-store URL), or
        None to have the server send the bytes (the default)."""
        return None

    # -- readiness (registry/monitoring/health.py) ------------------------------------
    @abc.abstractmethod
    async def probe(self) -> None:
        """Write a few bytes to the store's temp area, read them back and delete them: the
        store can be read and written now. Raises StorageFull when there is no room, another
        StorageError when the store cannot be used."""

    # -- verification (storage/fsck.py) ------------------------------------------------
    async def check_layout(self) -> tuple[list[str], list[str]]:
        """(problems, notes) about the driver's own storage that the methods above cannot
        show: entries it does not recognise or would never look at (a stray file, a blob
        filed under the wrong key), leftovers of interrupted writes. fsck reports them with
        what it finds through the interface. The default finds nothing."""
        return [], []

    async def close(self) -> None:
        """Release resources; the default driver holds none."""
