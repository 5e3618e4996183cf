"""The filesystem storage driver (the embedded default). Layout: see layout.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Iterable

from ocispec.digest import Digest, InvalidDigest, is_supported_algorithm, new_hasher
from ocispec.names import is_valid_tag

from . import atomic
from .content_cache import ContentCache
from .driver import (
    BlobContent,
    BlobLink,
    Collection,
    ManifestLink,
    OutboxLease,
    OutboxRecord,
    RepositorySnapshot,
    Stamped,
    StorageDriver,
    StoredBlob,
    UploadInfo,
    UploadQuota,
    UsageLedger,
    is_valid_outbox_key,
    new_outbox_key,
)
from .errors import (
    FULL_ERRNOS,
    BlobNotFound,
    DigestMismatch,
    RangeMismatch,
    RepositoryBusy,
    SizeMismatch,
    StorageFull,
    StoreUnavailable,
    TooLarge,
    TooManyUploads,
    UploadBusy,
    UploadNotFound,
)
from .layout import Layout, RepositoryWalk, is_repository_dir, is_valid_upload_id, walk_repositories
from .ledger import FilesystemLedger
from .writeback import start_writeback

# Received bytes are handed to a worker thread (write + hash) in batches of this size:
# bounded memory per upload, and few thread hops per GiB. While the batches of all uploads
# in progress hold more than the budget, each is written out as soon as it gets a chunk, so
# many concurrent uploads cost the process at most about that much.
WRITE_BATCH = 1 << 20
WRITE_BATCH_CHUNKS = 512  # within IOV_MAX (1024 on Linux) for one pwritev
BATCH_BUDGET = 16 << 20
READ_CHUNK = 1 << 20
LOCK_WAIT_SECONDS = 30.0
# A flock held by another process is polled after 0.25 ms, then at doubling intervals up to
# 2 ms: a repository's lock is held for well under a millisecond by a push, so a longer pause
# is the waiter's own delay (at 5 ms, pushes from two workers to one repository waited on it).
LOCK_POLL_FIRST_SECONDS = 0.00025
LOCK_POLL_MAX_SECONDS = 0.002
# A collection waits this long for the pushes and mounts in progress to finish their checks.
COLLECTOR_LOCK_WAIT_SECONDS = 60.0
# note_references writes a journal this large or larger from a worker thread.
JOURNAL_LINES_INLINE = 1000
MAX_CACHED_HASHES = 1024
# Manifests read or written lately, kept in memory (per process: each worker has its own).
SMALL_BLOB_CACHE_BYTES = 8 << 20
# Tag and link files are a few hundred bytes; one read of this size takes all of one.
LINK_READ_BYTES = 4096
# iter_repositories finds this many names in its first thread hop, four times more in each next.
REPOSITORIES_FIRST_BATCH = 128
REPOSITORIES_MAX_BATCH = 8192
# delete_repository's steps, in an order that keeps the store consistent after any of them.
REPOSITORY_DELETE_STEPS = ("tags", "referrers", "revisions", "layers", "uploads", "cache", "directory")


@dataclass
class _HashState:
    """Running hash of an upload's data, valid while `offset` equals the data size.

    Only a cache: if it is missing (another process took the chunk, or a restart) the
    data file is re-hashed at commit, so correctness never depends on process memory.
    """
    offset: int
    hasher: object


class FilesystemDriver(StorageDriver):
    stores_manifests_before_locking = True  # a check is a stat; a write is two fsyncs
    def __init__(self, root: Path | str):
        self.layout = Layout(Path(root).resolve())
        self._small_blobs = ContentCache(SMALL_BLOB_CACHE_BYTES)
        for directory in (self.layout.blobs, self.layout.repositories, self.layout.uploads, self.layout.tmp):
            atomic.make_dirs(directory)
        self._hash_states: dict[str, _HashState] = {}
        self._local_turns = _Turns()

    @property
    def root(self) -> Path:
        return self.layout.root

    # -- blobs ----------------------------------------------------------------------
    async def stat_blob(self, digest: Digest) -> BlobContent | None:
        path = self.layout.blob(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return BlobContent(digest, size, path)

    async def read_blob(self, digest: Digest, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        path = self.layout.blob(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        try:
            remaining = os.fstat(fd).st_size - start if length is None else length
            offset = start
            while remaining > 0:
                chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, remaining), offset)
                if not chunk:
                    break
                offset += len(chunk)
                remaining -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def read_small_blob(self, digest: Digest, limit: int) -> bytes:
        cached = self._small_blobs.get(digest)
        if cached is not None:
            if len(cached) > limit:
                raise TooLarge(limit)
            return cached
        path = self.layout.blob(digest)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read(limit + 1)

        try:
            data = await asyncio.to_thread(read)
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        if len(data) > limit:
            raise TooLarge(limit)
        self._small_blobs.put(digest, data)
        return data

    async def put_small_blob(self, data: bytes, digest: Digest) -> None:
        path = self.layout.blob(digest)
        if not path.exists():
            await _finish_in_thread(atomic.atomic_write, path, data, self.layout.tmp)
        self._small_blobs.put(digest, data)

    # -- repository membership ------------------------------------------------------
    async def link_blob(self, repository: str, digest: Digest) -> None:
        path = self.layout.layer_link(repository, digest)
        # Linked (again) just now: a collection's grace period counts from now, for the link
        # and for the blob (so an old blob committed or mounted again is young again).
        try:
            os.utime(path)
        except FileNotFoundError:
            await asyncio.to_thread(atomic.atomic_write, path, str(digest).encode(), self.layout.tmp)
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.layout.blob(digest))

    async def unlink_blob(self, repository: str, digest: Digest) -> bool:
        return await asyncio.to_thread(_remove_link, self.layout.layer_link(repository, digest))

    async def is_blob_linked(self, repository: str, digest: Digest) -> bool:
        return self.layout.layer_link(repository, digest).is_file()

    async def repositories_linking_blob(self, digest: Digest) -> list[str]:
        names = await self.list_repositories()
        return [name for name in names if self.layout.layer_link(name, digest).is_file()]

    async def link_manifest(self, repository: str, digest: Digest, media_type: str) -> None:
        record = json.dumps({"digest": str(digest), "mediaType": media_type}).encode()
        path = self.layout.revision_link(repository, digest)
        await _finish_in_thread(atomic.atomic_write, path, record, self.layout.tmp)

    async def get_manifest_link(self, repository: str, digest: Digest) -> ManifestLink | None:
        try:
            record = json.loads(_read_link_file(self.layout.revision_link(repository, digest)))
        except FileNotFoundError:
            return None
        return ManifestLink(digest, record["mediaType"])

    async def unlink_manifest(self, repository: str, digest: Digest) -> bool:
        return await asyncio.to_thread(atomic.remove, self.layout.revision_link(repository, digest))

    async def list_manifests(self, repository: str) -> list[ManifestLink]:
        links = []
        revisions = self.layout.revisions(repository)
        for algorithm_dir in _subdirs(revisions):
            for entry in sorted(_listdir(algorithm_dir)):  # gone meanwhile (a repository deleted): none
                with contextlib.suppress(InvalidDigest):
                    link = await self.get_manifest_link(repository, Digest.parse(f"{algorithm_dir.name}:{entry}"))
                    if link:
                        links.append(link)
        return links

    @contextlib.asynccontextmanager
    async def staged_manifest_links(self, repository: str, digest: Digest, media_type: str,
                                    referrer: tuple[Digest, dict] | None, tags: tuple[str, ...]):
        # Written and fsynced to temp files before the lock (pushes to one repository do that
        # side by side); under it only renamed into place, a file whose content is there
        # already left alone; the directories of what was renamed fsynced after it. The
        # revision link and referrer entry are made durable before any tag is renamed, so a
        # crash never leaves a tag naming a manifest the repository does not hold.
        first = [(self.layout.revision_link(repository, digest),
                  json.dumps({"digest": str(digest), "mediaType": media_type}).encode())]
        if referrer is not None:
            subject, descriptor = referrer
            first.append((self.layout.referrer(repository, subject, Digest.parse(descriptor["digest"])),
                          json.dumps(descriptor).encode()))
        then = [(self.layout.tag(repository, tag), str(digest).encode()) for tag in tags]
        # A file that holds its content already (a manifest pushed again) is not staged; should
        # it be gone by the time the lock is held, it is written there.
        staged = await _finish_in_thread(_stage_files, first + then, self.layout.tmp)
        renamed: set[Path] = set()

        async def install() -> None:
            for (path, data), tmp in zip(first, staged):
                await _install_if_changed(tmp, path, data, renamed, self.layout.tmp)
            if renamed:
                await _finish_in_thread(_fsync_dirs, renamed)
                renamed.clear()
            for (path, data), tmp in zip(then, staged[len(first):]):
                await _install_if_changed(tmp, path, data, renamed, self.layout.tmp)

        try:
            yield install
            if renamed:
                await _finish_in_thread(_fsync_dirs, renamed)
        finally:
            for tmp in staged:
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)

    # -- tags -----------------------------------------------------------------------
    async def set_tag(self, repository: str, tag: str, digest: Digest) -> None:
        path = self.layout.tag(repository, tag)
        await _finish_in_thread(atomic.atomic_write, path, str(digest).encode(), self.layout.tmp)

    async def resolve_tag(self, repository: str, tag: str) -> Digest | None:
        try:
            return Digest.parse(_read_link_file(self.layout.tag(repository, tag)).decode())
        except FileNotFoundError:
            return None

    async def delete_tag(self, repository: str, tag: str) -> bool:
        return await asyncio.to_thread(atomic.remove, self.layout.tag(repository, tag))

    async def list_tags(self, repository: str) -> list[str]:
        try:
            return sorted(os.listdir(self.layout.tags(repository)))
        except FileNotFoundError:
            return []

    async def stamp_tags(self, repository: str, tags: Iterable[str]) -> dict[str, Stamped]:
        # On the event loop, as resolve_tag: a page of tag files the page cache holds is read
        # faster here than the hop to a worker thread costs (measured: 1 ms against 4 for 100).
        stamps = {}
        directory = os.fspath(self.layout.tags(repository))
        for tag in tags:
            if not is_valid_tag(tag):
                continue
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(os.path.join(directory, tag), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    stamps[tag] = Stamped(Digest.parse(os.read(fd, LINK_READ_BYTES).decode()), os.fstat(fd).st_mtime)
                finally:
                    os.close(fd)
        return stamps

    # -- referrers ------------------------------------------------------------------
    async def add_referrer(self, repository: str, subject: Digest, descriptor: dict) -> None:
        referrer = Digest.parse(descriptor["digest"])
        path = self.layout.referrer(repository, subject, referrer)
        await _finish_in_thread(atomic.atomic_write, path, json.dumps(descriptor).encode(), self.layout.tmp)

    async def remove_referrer(self, repository: str, subject: Digest, referrer: Digest) -> None:
        await asyncio.to_thread(atomic.remove, self.layout.referrer(repository, subject, referrer))

    async def list_referrers(self, repository: str, subject: Digest) -> list[Digest]:
        try:
            entries = sorted(os.listdir(self.layout.referrers(repository, subject)))
        except FileNotFoundError:
            return []
        digests = []
        for entry in entries:
            with contextlib.suppress(InvalidDigest):
                digests.append(Digest.parse(entry.replace("-", ":", 1)))
        return digests

    async def read_referrer(self, repository: str, subject: Digest, referrer: Digest) -> dict | None:
        try:
            return json.loads(self.layout.referrer(repository, subject, referrer).read_bytes())
        except FileNotFoundError:
            return None

    async def list_referrer_subjects(self, repository: str) -> list[Digest]:
        return await asyncio.to_thread(_digest_entries, self.layout.repository(repository) / "_referrers",
                                       lambda subject: bool(_listdir(subject)))

    # -- repositories ---------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def repository_lock(self, repository: str):
        path = self.layout.repository_lock(repository)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        # The pushes of this process wait their turn in order (flock has no queue: polled by
        # every waiter, it goes to whichever looks first, and the unlucky wait for seconds);
        # only the first in line polls the flock, which other processes may hold.
        async with self._local_turns.turn(repository, deadline):
            with _no_space_as_storage_full():
                atomic.make_dirs(path.parent)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not await _flock(fd, wait=max(0.0, deadline - time.monotonic())):
                    raise RepositoryBusy(repository)
                yield
            finally:
                os.close(fd)

    async def repository_exists(self, repository: str) -> bool:
        return is_repository_dir(self.layout.repository(repository))

    async def list_repositories(self) -> list[str]:
        return await asyncio.to_thread(walk_repositories, self.layout)

    async def iter_repositories(self, after: str | None = None) -> AsyncIterator[str]:
        walk = RepositoryWalk(self.layout, after)
        batch = REPOSITORIES_FIRST_BATCH
        while True:
            names = await asyncio.to_thread(walk.next_batch, batch)
            for name in names:
                yield name
            if len(names) < batch:
                return
            batch = min(batch * 4, REPOSITORIES_MAX_BATCH)

    # -- upload sessions ------------------------------------------------------------
    async def create_upload(self, repository: str, owner: str | None = None,
                            quota: UploadQuota | None = None) -> UploadInfo:
        quota = quota or UploadQuota()
        uuid = str(uuidlib.uuid4())
        started = time.time()
        # Every session is listed in its owner's and its repository's index (so that a cap
        # configured later counts it too); a capped index is counted and added to under its
        # flock, the owner's before the repository's in every process.
        indexes = [(self.layout.owner_uploads(owner), quota.per_owner, "user"),
                   (self.layout.repository_uploads(repository), quota.per_repository, "repository")]
        capped = [(index, limit, scope) for index, limit, scope in indexes if limit]
        async with self._locked_indexes([index for index, _, _ in capped]):
            await _finish_in_thread(self._create_upload, uuid, repository, started, owner,
                                    [index for index, _, _ in indexes], capped, quota.active_since)
        return UploadInfo(uuid, repository, 0, started, owner)

    @contextlib.asynccontextmanager
    async def _locked_indexes(self, indexes: list[Path]):
        fds = []
        try:
            for index in indexes:
                with _no_space_as_storage_full():
                    atomic.make_dirs(index)
                fds.append(os.open(index, os.O_RDONLY | os.O_DIRECTORY))
                if not await _flock(fds[-1]):
                    raise RepositoryBusy(index.name)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    def _create_upload(self, uuid: str, repository: str, started: float, owner: str | None,
                       indexes: list[Path], capped: list[tuple[Path, int, str]], active_since: float) -> None:
        for index, limit, scope in capped:
            if self._open_sessions(index, limit, active_since) >= limit:
                raise TooManyUploads(scope, limit)
        # Index entries first: after a crash an entry without a session is dropped when
        # counted; a session without entries would go uncounted. (Not fsynced: after a power
        # cut a few sessions may go uncounted until they expire.)
        directory = self.layout.upload(uuid)
        try:
            for index in indexes:
                atomic.make_dirs(index)
                (index / uuid).touch()
            atomic.make_dirs(directory)
            (directory / "data").touch()
            info = json.dumps({"repository": repository, "started_at": started, "owner": owner}).encode()
            atomic.atomic_write(directory / "info", info, self.layout.tmp)
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)
            for index in indexes:
                (index / uuid).unlink(missing_ok=True)
            raise

    async def get_upload(self, uuid: str) -> UploadInfo:
        if not is_valid_upload_id(uuid):
            raise UploadNotFound(uuid)
        directory = self.layout.upload(uuid)
        try:
            info = json.loads((directory / "info").read_bytes())
            size = (directory / "data").stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise UploadNotFound(uuid) from None
        return UploadInfo(uuid, info["repository"], size, info["started_at"], info.get("owner"))

    @contextlib.asynccontextmanager
    async def _locked_upload(self, uuid: str):
        """Hold the session's data file under an exclusive flock (across processes too)."""
        info = await self.get_upload(uuid)
        data_path = self.layout.upload(uuid) / "data"
        try:
            fd = os.open(data_path, os.O_RDWR)
        except FileNotFoundError:
            raise UploadNotFound(uuid) from None
        try:
            if not await _flock(fd):
                raise UploadBusy(uuid)
            # The session may have been committed or cancelled while we waited.
            try:
                same = os.stat(data_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise UploadNotFound(uuid)
            yield info, fd
        finally:
            os.close(fd)

    async def append_upload(self, uuid: str, chunks: AsyncIterable[bytes], *,
                            offset: int | None = None, length: int | None = None,
                            max_size: int | None = None) -> UploadInfo:
        async with self._locked_upload(uuid) as (info, fd):
            start = os.fstat(fd).st_size
            if offset is not None and offset != start:
                raise RangeMismatch(start)
            state = self._hash_states.pop(uuid, None)
            if state is None and start == 0:
                state = _HashState(0, new_hasher("sha256"))
            hasher = state.hasher if state is not None and state.offset == start else None
            try:
                end = await _receive(fd, start, chunks, hasher, length, max_size)
                # The client is told these bytes are stored; make it true before answering.
                await _finish_in_thread(os.fsync, fd)
            except StorageFull as exc:
                # A session that cannot grow holds space that others need: drop all of it.
                await asyncio.to_thread(self._remove_upload, uuid)
                raise StorageFull(f"{exc}; removed the upload session {uuid} and the {start} bytes "
                                  "it held before this request") from None
            except BaseException:
                os.ftruncate(fd, start)
                raise
            if hasher is not None:
                self._remember_hash(uuid, _HashState(end, hasher))
            return UploadInfo(uuid, info.repository, end, info.started_at, info.owner)

    def _remember_hash(self, uuid: str, state: _HashState) -> None:
        self._hash_states[uuid] = state
        while len(self._hash_states) > MAX_CACHED_HASHES:
            # Sessions finished by another process never come back here: forget the oldest.
            self._hash_states.pop(next(iter(self._hash_states)))

    async def put_blob(self, repository: str, digest: Digest, chunks: AsyncIterable[bytes], *,
                       length: int | None = None, max_size: int | None = None) -> BlobContent:
        self.layout.repository(repository)  # validates the name before any byte is written
        tmp = self.layout.tmp / f"{uuidlib.uuid4().hex}.blob"
        with _no_space_as_storage_full():
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            hasher = new_hasher(digest.algorithm)
            size = await _receive(fd, 0, chunks, hasher, length, max_size)
            if hasher.hexdigest() != digest.encoded:
                raise DigestMismatch(str(digest), f"{digest.algorithm}:{hasher.hexdigest()}")
            await self._install_and_link(fd, tmp, digest, repository)
        except StorageFull as exc:
            raise StorageFull(f"{exc}; discarded the upload") from None
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        return BlobContent(digest, size, self.layout.blob(digest))

    async def commit_upload(self, uuid: str, digest: Digest, *, size: int | None = None) -> BlobContent:
        async with self._locked_upload(uuid) as (info, fd):
            actual_size = os.fstat(fd).st_size
            state = self._hash_states.pop(uuid, None)
            try:
                if size is not None and size != actual_size:
                    raise SizeMismatch(size, actual_size)
                if state is not None and state.offset == actual_size and state.hasher.name == digest.algorithm:
                    actual = state.hasher.hexdigest()
                else:
                    actual = await asyncio.to_thread(_hash_file, fd, digest.algorithm)
                if actual != digest.encoded:
                    raise DigestMismatch(str(digest), f"{digest.algorithm}:{actual}")
                await self._install_and_link(fd, self.layout.upload(uuid) / "data", digest, info.repository)
            except RepositoryBusy:
                raise  # a collection held the store too long: the session stays, to be committed again
            except BaseException:
                await asyncio.to_thread(self._remove_upload, uuid)
                raise
            await asyncio.to_thread(self._remove_upload, uuid)
            return BlobContent(digest, actual_size, self.layout.blob(digest))

    async def _install_and_link(self, fd: int, path: Path, digest: Digest, repository: str) -> None:
        """Store the verified file as the blob and link it, under the reference guard: a
        collection must not delete an identical blob stored earlier between this finding it
        there and linking it."""
        if not self.layout.blob(digest).exists():
            await _finish_in_thread(os.fsync, fd)  # the slow part, before holding anyone off
        async with self.reference_guard():
            await _finish_in_thread(self._install_file, fd, path, digest)
            await self.note_references(blobs=[digest])
            await self.link_blob(repository, digest)

    def _install_file(self, fd: int, path: Path, digest: Digest) -> None:
        """Make the verified file at `path` (open as `fd`) the blob `digest`."""
        target = self.layout.blob(digest)
        if target.exists():
            return  # identical content by definition
        os.fsync(fd)
        atomic.install(path, target)

    async def cancel_upload(self, uuid: str) -> None:
        async with self._locked_upload(uuid):
            self._hash_states.pop(uuid, None)
            await asyncio.to_thread(self._remove_upload, uuid)

    def _open_sessions(self, index: Path, limit: int, active_since: float) -> int:
        """Sessions in `index` that are neither gone nor expired. Only an index at its limit
        is checked entry by entry (dropping entries whose session is gone)."""
        try:
            entries = os.listdir(index)
        except FileNotFoundError:
            return 0
        if len(entries) < limit:
            return len(entries)
        count = 0
        for uuid in entries:
            last_active = self._last_activity(uuid)
            if last_active is None:
                (index / uuid).unlink(missing_ok=True)
            elif last_active >= active_since:
                count += 1
        return count

    def _last_activity(self, uuid: str) -> float | None:
        """When the session started or last received bytes; None when it no longer exists."""
        if not is_valid_upload_id(uuid):
            return None
        directory = self.layout.upload(uuid)
        try:
            if not (directory / "info").exists():
                return None
            return max(_started_at(directory), (directory / "data").stat().st_mtime)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _remove_upload(self, uuid: str) -> None:
        directory = self.layout.upload(uuid)
        try:
            info = json.loads((directory / "info").read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            info = None
        # Drop `info` first: from then on the session no longer exists for anyone.
        with contextlib.suppress(FileNotFoundError):
            (directory / "info").unlink()
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(info, dict):
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                for index in (self.layout.owner_uploads(info.get("owner")),
                              self.layout.repository_uploads(info["repository"])):
                    (index / uuid).unlink(missing_ok=True)

    async def list_uploads(self) -> list[str]:
        return sorted(entry for entry in _listdir(self.layout.uploads) if is_valid_upload_id(entry))

    async def purge_uploads(self, older_than: float) -> int:
        return await asyncio.to_thread(self._purge, older_than)

    def _purge(self, older_than: float) -> int:
        purged = 0
        for entry in os.listdir(self.layout.uploads):
            if is_valid_upload_id(entry) and self._purge_session(entry, older_than):
                self._hash_states.pop(entry, None)
                purged += 1
        self._purge_temp(older_than)
        return purged

    def _purge_temp(self, older_than: float) -> int:
        removed = 0
        for entry in os.listdir(self.layout.tmp):
            path = self.layout.tmp / entry
            if _mtime(path) < older_than:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def _purge_session(self, uuid: str, older_than: float) -> bool:
        """Remove a session idle since before `older_than`, unless a request holds it now."""
        directory = self.layout.upload(uuid)
        try:
            fd = os.open(directory / "data", os.O_RDONLY)
        except FileNotFoundError:
            # Half-created or half-removed: judge by the directory's age.
            if _mtime(directory) < older_than:
                self._remove_upload(uuid)
                return True
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being written or committed right now
            if max(_started_at(directory), os.fstat(fd).st_mtime) >= older_than:
                return False
            self._remove_upload(uuid)
            return True
        finally:
            os.close(fd)

    # -- usage accounting and whole-repository removal ----------------------------------
    async def list_blob_links(self, repository: str) -> list[BlobLink]:
        return await asyncio.to_thread(_blob_links, self.layout.repository(repository) / "_layers")

    def usage_ledger(self, key: str) -> UsageLedger:
        return FilesystemLedger(self.layout.usage_ledger(key), self.layout.tmp, _flock)

    async def delete_repository(self, repository: str) -> bool:
        if not await self.repository_exists(repository):
            return False
        for step in REPOSITORY_DELETE_STEPS:
            await asyncio.to_thread(self._delete_repository_step, repository, step)
        return True

    def _delete_repository_step(self, name: str, step: str) -> None:
        directory = self.layout.repository(name)
        parts = {"tags": self.layout.tags(name), "referrers": directory / "_referrers",
                 "revisions": directory / "_manifests", "layers": directory / "_layers",
                 "cache": self.layout.cache_records(name)}
        if step in parts:
            shutil.rmtree(parts[step], ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                atomic.fsync_dir(parts[step].parent)
        elif step == "uploads":
            # Sessions would link their blob into the repository again when committed.
            # One that a request is writing right now is left to finish (or expire).
            index = self.layout.repository_uploads(name)
            for uuid in _listdir(index):
                if is_valid_upload_id(uuid) and self._purge_session(uuid, float("inf")):
                    self._hash_states.pop(uuid, None)
        elif step == "directory":
            # Up to the first directory still holding something (a nested repository).
            while directory != self.layout.repositories:
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent
            atomic.fsync_dir(directory)
        else:
            raise ValueError(f"unknown step {step!r}")


    # -- the pull-through cache's bookkeeping -------------------------------------------
    async def read_cache_record(self, repository: str, key: str) -> bytes | None:
        try:
            return self.layout.cache_record(repository, key).read_bytes()
        except FileNotFoundError:
            return None

    async def write_cache_record(self, repository: str, key: str, data: bytes) -> None:
        path = self.layout.cache_record(repository, key)
        with _no_space_as_storage_full():
            await _finish_in_thread(atomic.atomic_write, path, data, self.layout.tmp)

    async def list_cache_records(self, repository: str) -> dict[str, bytes]:
        return await asyncio.to_thread(_read_files, self.layout.cache_records(repository))

    async def delete_cache_record(self, repository: str, key: str) -> None:
        await asyncio.to_thread(atomic.remove, self.layout.cache_record(repository, key))

    # -- outboxes ---------------------------------------------------------------------
    async def append_outbox(self, outbox: str, data: bytes) -> str:
        key = new_outbox_key()
        path = self.layout.outbox_record(outbox, key)
        with _no_space_as_storage_full():
            await _finish_in_thread(atomic.atomic_write, path, data, self.layout.tmp)
        return key

    async def pending_outbox(self, outbox: str, limit: int) -> list[OutboxRecord]:
        return await asyncio.to_thread(_outbox_records, self.layout.outbox(outbox) / "pending", limit)

    async def remove_outbox(self, outbox: str, keys: list[str]) -> None:
        paths = [self.layout.outbox_record(outbox, key) for key in keys]
        await asyncio.to_thread(_remove_files, paths)

    async def fail_outbox(self, outbox: str, key: str) -> None:
        source = self.layout.outbox_record(outbox, key)
        target = self.layout.outbox_record(outbox, key, "failed")
        with _no_space_as_storage_full():
            await asyncio.to_thread(_move, source, target)

    async def failed_outbox(self, outbox: str) -> list[OutboxRecord]:
        return await asyncio.to_thread(_outbox_records, self.layout.outbox(outbox) / "failed", None)

    @contextlib.asynccontextmanager
    async def outbox_lease(self, outbox: str):
        path = self.layout.outbox(outbox) / "lock"
        with _no_space_as_storage_full():
            fd = self._open_lock(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield OutboxLease()  # a flock is never lost while its holder lives
        finally:
            os.close(fd)

    # -- verification ---------------------------------------------------------------
    async def check_layout(self) -> tuple[list[str], list[str]]:
        return await asyncio.to_thread(self._check_layout)

    def _check_layout(self) -> tuple[list[str], list[str]]:
        """What iter_blobs and the listings pass over: names that are no digest, or not where
        this driver looks for them; and unfinished temp files."""
        problems: list[str] = []
        for algorithm_dir in _entries(self.layout.blobs):
            if not (algorithm_dir.is_dir() and is_supported_algorithm(algorithm_dir.name)):
                problems.append(f"stray file in blob store: {algorithm_dir}")
                continue
            for prefix_dir in _entries(algorithm_dir):
                for path in _entries(prefix_dir) if prefix_dir.is_dir() else [prefix_dir]:
                    try:
                        digest = Digest.parse(f"{algorithm_dir.name}:{path.name}")
                    except InvalidDigest:
                        problems.append(f"stray file in blob store: {path}")
                        continue
                    if path.parent != prefix_dir or path.name[:2] != prefix_dir.name:
                        problems.append(f"blob {digest} is filed under the wrong prefix: {path}")
        for name in walk_repositories(self.layout):
            top = self.layout.repository(name)
            for kind, directory in (("layer link", top / "_layers"), ("manifest link", self.layout.revisions(name)),
                                    ("referrer entry", top / "_referrers")):
                for algorithm_dir in _entries(directory):
                    for path in _entries(algorithm_dir) if algorithm_dir.is_dir() else [algorithm_dir]:
                        try:
                            Digest.parse(f"{algorithm_dir.name}:{path.name}")
                        except InvalidDigest:
                            problems.append(f"{name}: stray {kind} {path}")
                            continue
                        if kind == "referrer entry":  # path is the subject's directory
                            for entry in _entries(path):
                                try:
                                    Digest.parse(entry.name.replace("-", ":", 1))
                                except InvalidDigest:
                                    problems.append(f"{name}: stray referrer entry {entry}")
        notes = []
        leftovers = len(_listdir(self.layout.tmp))
        if leftovers:
            notes.append(f"{leftovers} unfinished temp file(s) in tmp/ (harmless; purged with old uploads)")
        return problems, notes

    # -- garbage collection ---------------------------------------------------------
    def _open_lock(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            atomic.make_dirs(path.parent)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.asynccontextmanager
    async def reference_guard(self):
        # In through the turnstile, which a collection holds while it waits for or holds the
        # guard: flock() has no queue, so without it a steady stream of pushes could keep
        # the shared lock held forever.
        turnstile = self._open_lock(self.layout.gc_turnstile)
        guard = -1
        try:
            guard = self._open_lock(self.layout.gc_guard)
            if not await _flock(turnstile) or not await _flock(guard, fcntl.LOCK_SH):
                raise RepositoryBusy("the store (a garbage collection is deleting)")
            os.close(turnstile)
            turnstile = -1
            yield
        finally:
            for fd in (guard, turnstile):
                if fd >= 0:
                    os.close(fd)

    @contextlib.asynccontextmanager
    async def _exclusive_guard(self):
        turnstile = self._open_lock(self.layout.gc_turnstile)
        guard = -1
        try:
            guard = self._open_lock(self.layout.gc_guard)
            if not await _flock(turnstile, wait=COLLECTOR_LOCK_WAIT_SECONDS) \
                    or not await _flock(guard, wait=COLLECTOR_LOCK_WAIT_SECONDS):
                raise RepositoryBusy("the store (references were being made for too long)")
            yield
        finally:
            for fd in (guard, turnstile):  # the guard first: it is only ever taken through the turnstile
                if fd >= 0:
                    os.close(fd)

    async def note_references(self, *, manifests=(), blobs=()) -> None:
        if not self.layout.gc_marker.exists():
            return
        # Each record starts on a fresh line: a write cut short (a full disk) cannot run into
        # the next process's record.
        lines = [f"\nm {digest}" for digest in manifests] + [f"\nb {digest}" for digest in blobs]
        if not lines:
            return
        data = ("".join(lines) + "\n").encode()
        if len(lines) < JOURNAL_LINES_INLINE:
            _append(self.layout.gc_journal, data)
        else:
            await asyncio.to_thread(_append, self.layout.gc_journal, data)

    @contextlib.asynccontextmanager
    async def collection(self):
        fd = self._open_lock(self.layout.gc_run)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                another_running = False
            except BlockingIOError:
                another_running = True
            if another_running:
                yield None
                return
            atomic.make_dirs(self.layout.gc)
            async with self._exclusive_guard():
                # From here on every guard holder journals what it references. (A marker and
                # journal a crashed collector left behind are replaced.)
                await asyncio.to_thread(self._start_journal)
            try:
                yield _FilesystemCollection(self)
            finally:
                # No lock needed: nothing is deleted any more, so the journal has no reader.
                for path in (self.layout.gc_marker, self.layout.gc_journal):
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    atomic.atomic_write(self.layout.gc_last, repr(time.time()).encode(), self.layout.tmp)
        finally:
            os.close(fd)

    def _start_journal(self) -> None:
        with open(self.layout.gc_journal, "wb"):
            pass
        marker = json.dumps({"id": uuidlib.uuid4().hex, "pid": os.getpid(), "started_at": time.time()})
        atomic.atomic_write(self.layout.gc_marker, marker.encode(), self.layout.tmp)

    async def last_collection(self) -> float | None:
        try:
            return float(self.layout.gc_last.read_text())
        except (FileNotFoundError, ValueError):
            return None

    async def iter_blobs(self) -> AsyncIterator[StoredBlob]:
        for algorithm_dir in _subdirs(self.layout.blobs):
            if not is_supported_algorithm(algorithm_dir.name):
                continue
            for prefix_dir in _subdirs(algorithm_dir):
                for blob in await asyncio.to_thread(_scan_blobs, prefix_dir, algorithm_dir.name):
                    yield blob

    async def snapshot_repository(self, repository: str) -> RepositorySnapshot:
        return await asyncio.to_thread(self._snapshot, repository)

    def _snapshot(self, repository: str) -> RepositorySnapshot:
        tags = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.layout.tags(repository)):
                if not is_valid_tag(entry.name):
                    continue
                with contextlib.suppress(OSError, ValueError), open(entry.path, "rb") as f:
                    tags[entry.name] = Stamped(Digest.parse(f.read(200).decode()), os.fstat(f.fileno()).st_mtime)
        return RepositorySnapshot(repository, tags, _stamped_digests(self.layout.revisions(repository)),
                                  _stamped_digests(self.layout.repository(repository) / "_layers"))

    async def unlink_blobs(self, links: list[tuple[str, Digest]]) -> None:
        await asyncio.to_thread(_remove_all, [self.layout.layer_link(name, digest) for name, digest in links])

    async def delete_blobs(self, digests: list[Digest]) -> None:
        for digest in digests:
            self._small_blobs.drop(digest)
        await asyncio.to_thread(_remove_all, [self.layout.blob(digest) for digest in digests])

    async def remove_repository_if_empty(self, repository: str) -> bool:
        async with self.repository_lock(repository):
            return await asyncio.to_thread(self._remove_if_empty, repository)

    def _remove_if_empty(self, repository: str) -> bool:
        top = self.layout.repository(repository)
        own = [top / "_layers", top / "_manifests", top / "_referrers"]
        if any(_has_files(directory) for directory in own):
            return False
        for directory in own:
            _remove_empty_tree(directory)
        shutil.rmtree(self.layout.cache_records(repository), ignore_errors=True)  # records of nothing
        # Then the directory itself and the parents that hold nothing else (rmdir() refuses
        # a directory that is not empty: a nested repository keeps its parents).
        path = top
        while path != self.layout.repositories:
            try:
                path.rmdir()
            except OSError:
                break
            path = path.parent
        with contextlib.suppress(FileNotFoundError):
            atomic.fsync_dir(path)
        return not is_repository_dir(top)

    async def purge_temp(self, older_than: float) -> int:
        return await asyncio.to_thread(self._purge_temp, older_than)

    async def probe(self) -> None:
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        path = self.layout.tmp / f"probe-{uuidlib.uuid4().hex}"
        data = os.urandom(16)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # No fsync: polled every second, it would wait behind every upload's writeback.
                # Filesystems that allocate late (ext4, XFS) still reserve the space at write().
                os.write(fd, data)
                back = os.pread(fd, len(data) + 1, 0)
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        except OSError as exc:
            text = f"{path.parent}: {exc.strerror or exc}"
            raise (StorageFull if exc.errno in FULL_ERRNOS else StoreUnavailable)(text) from exc
        if back != data:
            raise StoreUnavailable(f"{path.parent}: a probe file read back other bytes than were written")


class _FilesystemCollection(Collection):
    def __init__(self, driver: FilesystemDriver):
        self._driver = driver
        self._position = 0

    def exclusive(self):
        return self._driver._exclusive_guard()

    async def read_journal(self) -> tuple[set[Digest], set[Digest]]:
        return await asyncio.to_thread(self._read_journal)

    def _read_journal(self) -> tuple[set[Digest], set[Digest]]:
        manifests: set[Digest] = set()
        blobs: set[Digest] = set()
        try:
            with open(self._driver.layout.gc_journal, "rb") as f:
                f.seek(self._position)
                data = f.read()
        except FileNotFoundError:
            return manifests, blobs
        complete = data.rfind(b"\n") + 1  # a record still being written is read next time
        self._position += complete
        for line in data[:complete].split(b"\n"):
            kind, _, text = line.decode(errors="replace").partition(" ")
            with contextlib.suppress(InvalidDigest):
                if kind == "m":
                    manifests.add(Digest.parse(text))
                elif kind == "b":
                    blobs.add(Digest.parse(text))
        return manifests, blobs


class _Turns:
    """First come, first served among this process's waiters for one key (a lock per key while
    anybody holds or waits for it)."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str, deadline: float):
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                    await lock.acquire()
            except TimeoutError:
                raise RepositoryBusy(key) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _outbox_records(directory: Path, limit: int | None) -> list[OutboxRecord]:
    records = []
    for key in sorted(name for name in _listdir(directory) if is_valid_outbox_key(name))[:limit]:
        try:
            records.append(OutboxRecord(key, (directory / key).read_bytes()))
        except FileNotFoundError:  # removed meanwhile (by a holder that lost the lease)
            continue
    return records


def _remove_files(paths: list[Path]) -> None:
    # No fsync: a removal a power cut undoes only has the records delivered again.
    for path in paths:
        path.unlink(missing_ok=True)


def _move(source: Path, target: Path) -> None:
    atomic.make_dirs(target.parent)
    try:
        os.replace(source, target)
    except FileNotFoundError:
        return
    atomic.fsync_dir(target.parent)
    atomic.fsync_dir(source.parent)


async def _flock(fd: int, mode: int = fcntl.LOCK_EX, wait: float | None = None) -> bool:
    """Take a flock (exclusive unless `mode` says) without blocking the event loop; False
    after `wait` seconds (default LOCK_WAIT_SECONDS)."""
    deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
    pause = LOCK_POLL_FIRST_SECONDS
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, LOCK_POLL_MAX_SECONDS)


@contextlib.contextmanager
def _no_space_as_storage_full():
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise StorageFull(os.strerror(exc.errno).lower()) from None
        raise


def _read_files(directory: Path) -> dict[str, bytes]:
    records = {}
    for name in _listdir(directory):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            records[name] = (directory / name).read_bytes()
    return records


def _remove_link(path: Path) -> bool:
    """atomic.remove, where a collection may remove the emptied directory meanwhile."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        atomic.fsync_dir(path.parent)
    return True


async def _finish_in_thread(func, *args):
    """Run blocking file work in a thread; if the request is cancelled meanwhile, wait for
    the thread to finish before letting the cancellation through, so that cleanup (truncate,
    unlink) never races a write that is still running. A full disk is StorageFull."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    with _no_space_as_storage_full():
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work})
            raise


async def _receive(fd: int, start: int, chunks: AsyncIterable[bytes], hasher, length: int | None,
                   max_size: int | None) -> int:
    """Write `chunks` at `start` (hashing them when `hasher` is given); returns the new end.
    Raises SizeMismatch when `length` bytes were promised and more or fewer came."""
    global _batched
    position = start
    batch: list[bytes] = []  # kept as received (no copy), written with one pwritev
    batch_size = 0
    # One batch is written and hashed in a thread while the next is received: at most one at
    # a time, so the writes and the hash go in order.
    writing: asyncio.Future | None = None

    async def write(chunks: list[bytes], at: int, size: int) -> None:
        global _batched
        try:
            await _finish_in_thread(_write_and_hash, fd, chunks, at, hasher)
        finally:
            _batched -= size

    async def flush() -> None:
        nonlocal position, batch, batch_size, writing
        if writing is not None:
            await writing
            writing = None
        chunks, size = batch, batch_size
        batch, batch_size = [], 0
        writing = asyncio.ensure_future(write(chunks, position, size))
        position += size

    try:
        async for chunk in chunks:
            if not chunk:  # the source is about to wait: do not hold its bytes meanwhile
                if batch:
                    await flush()
                continue
            batch.append(chunk)
            batch_size += len(chunk)
            _batched += len(chunk)
            received = position + batch_size - start
            if length is not None and received > length:
                raise SizeMismatch(length, received)
            if max_size is not None and position + batch_size > max_size:
                raise TooLarge(max_size)
            if batch_size >= WRITE_BATCH or len(batch) >= WRITE_BATCH_CHUNKS or _batched > BATCH_BUDGET:
                await flush()
        if batch:
            await flush()
        if writing is not None:
            await writing
    finally:
        _batched -= batch_size
        if writing is not None and not writing.done():
            await asyncio.wait({writing})  # the caller's clean-up must not race a write
        if writing is not None and not writing.cancelled():
            writing.exception()  # retrieved: an error raised already, or superseded by the one raising
    if length is not None and position - start != length:
        raise SizeMismatch(length, position - start)
    return position


_batched = 0  # bytes held in the batches of all uploads in progress


def _write_and_hash(fd: int, chunks: list[bytes], position: int, hasher) -> None:
    start = position
    views = [memoryview(chunk) for chunk in chunks]
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first:first + WRITE_BATCH_CHUNKS], position)
        position += written
        while written:
            if written >= len(views[first]):
                written -= len(views[first])
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0
    start_writeback(fd, start, position - start)
    if hasher is not None:
        for chunk in chunks:
            hasher.update(chunk)


def _hash_file(fd: int, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    offset = 0
    while chunk := os.pread(fd, READ_CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


def _started_at(directory: Path) -> float:
    """A session's start time from its info file; 0 when unreadable (so it counts as old)."""
    try:
        started = json.loads((directory / "info").read_bytes())["started_at"]
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
        return 0.0
    return started if isinstance(started, (int, float)) else 0.0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _append(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return  # the collection ended meanwhile
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _scan_blobs(prefix_dir: Path, algorithm: str) -> list[StoredBlob]:
    blobs = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(prefix_dir):
            if entry.name[:2] != prefix_dir.name:
                continue  # not where this driver would look for it (fsck reports it)
            with contextlib.suppress(InvalidDigest, FileNotFoundError):
                digest = Digest.parse(f"{algorithm}:{entry.name}")
                stat = entry.stat()
                blobs.append(StoredBlob(digest, stat.st_size, stat.st_mtime))
    return blobs


def _stamped_digests(directory: Path) -> dict[Digest, float]:
    """`<directory>/<alg>/<hex>` files -> their modification times."""
    found = {}
    for algorithm_dir in _subdirs(directory):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(algorithm_dir):
                with contextlib.suppress(InvalidDigest, FileNotFoundError):
                    found[Digest.parse(f"{algorithm_dir.name}:{entry.name}")] = entry.stat().st_mtime
    return found


def _remove_all(paths: list[Path]) -> None:
    """Unlink every path, then make the removals durable, one fsync per directory."""
    directories = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            directories.add(path.parent)
    for directory in directories:
        with contextlib.suppress(FileNotFoundError):
            atomic.fsync_dir(directory)


def _has_files(directory: Path) -> bool:
    return any(files for _, _, files in os.walk(directory))


def _remove_empty_tree(directory: Path) -> None:
    for current, _, _ in os.walk(directory, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(current)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _blob_links(layers: Path) -> list[BlobLink]:
    links = []
    for algorithm_dir in _subdirs(layers):
        for entry in _scandir(algorithm_dir):
            with contextlib.suppress(InvalidDigest, FileNotFoundError):
                links.append(BlobLink(Digest.parse(f"{algorithm_dir.name}:{entry.name}"), entry.stat().st_mtime))
    return links


def _entries(directory: Path) -> list[Path]:
    return [directory / name for name in sorted(_listdir(directory))]


def _digest_entries(directory: Path, keep) -> list[Digest]:
    """Sorted digests named by `<directory>/<alg>/<hex>` entries for which `keep(path)` holds."""
    found = []
    for algorithm_dir in _subdirs(directory):
        for path in _entries(algorithm_dir):
            with contextlib.suppress(InvalidDigest):
                digest = Digest.parse(f"{algorithm_dir.name}:{path.name}")
                if keep(path):
                    found.append(digest)
    return sorted(found)


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_link_file(path: Path) -> bytes:
    """A tag or link file's content, read on the event loop: a few hundred bytes the page cache
    holds cost less to read here (open, read, close) than a hop to a worker thread."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, LINK_READ_BYTES)
    finally:
        os.close(fd)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return _read_link_file(path) == data
    except (FileNotFoundError, NotADirectoryError):
        return False


def _stage_files(files: list[tuple[Path, bytes]], tmp_dir: Path) -> list[Path | None]:
    """For each file that does not hold its content yet, that content in an fsynced temp
    file, to be renamed into place (None for the others)."""
    staged: list[Path | None] = []
    try:
        for path, data in files:
            staged.append(None if _holds(path, data) else atomic.write_temp(data, tmp_dir))
    except BaseException:
        for tmp in staged:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return staged


async def _install_if_changed(tmp: Path | None, path: Path, data: bytes, renamed: set[Path], tmp_dir: Path) -> None:
    """Put `data` in `path` unless it is there already (from `tmp`, or a temp file written
    now if none was staged); note the directory changed."""
    if _holds(path, data):
        return
    if tmp is None:
        tmp = await _finish_in_thread(atomic.write_temp, data, tmp_dir)
    with _no_space_as_storage_full():
        atomic.make_dirs(path.parent)
    os.replace(tmp, path)
    renamed.add(path.parent)


def _fsync_dirs(directories) -> None:
    for directory in directories:
        atomic.fsync_dir(directory)
