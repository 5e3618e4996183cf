"""The S3 storage driver: any S3-compatible object store behind the same interface, so that
several stateless `kura serve` instances can share one bucket.

Keys (under the configured prefix) mirror the filesystem layout:
  blobs/<alg>/<hex[:2]>/<hex>                        content, written once, only when verified
  repositories/<name>/_layers/<alg>/<hex>            blob links (LastModified: when linked)
  repositories/<name>/_manifests/revisions/<alg>/<hex>   {"digest", "mediaType"}
  repositories/<name>/_manifests/tags/<tag>          the digest
  repositories/<name>/_referrers/<alg>/<hex>/<alg>-<hex>  the referrer's descriptor
  repositories/<name>/_cache/<key>                   the pull-through cache's records
  uploads/<uuid>                                     an upload session: its repository, owner,
                                                     size, chunk objects and running hash
  upload-data/<uuid>/<n>-<random>                    the chunks a session received
  upload-index/{owner,repository}/<sha256>/<uuid>    sessions per owner / repository (caps)
  usage/<key>                                        a usage ledger (s3_ledger.py)
  locks/...                                          leases (s3_leases.py)
  gc/running, gc/exclusive, gc/guards/<id>, gc/journal/<id>, gc/last   the collector's state
  outbox/<name>/{pending,failed}/<key>               durable queues of records (event notifications);
                                                     listed in key order, which is oldest first

Every piece of request state lives in the bucket: a chunked upload's PATCHes and PUT may land
on different instances, each carrying the running digest forward (resumable_hash.py), and an
append or a ledger change is a conditional write that loses cleanly to a concurrent one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hashlib
import json
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Iterable

from ocispec.digest import Digest, InvalidDigest, is_supported_algorithm, new_hasher
from ocispec.names import is_valid_name, is_valid_tag

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
    is_valid_outbox_name,
    new_outbox_key,
)
from .errors import (
    BlobNotFound,
    DigestMismatch,
    RangeMismatch,
    RepositoryBusy,
    SizeMismatch,
    StoreUnavailable,
    TooLarge,
    TooManyUploads,
    UploadBusy,
    UploadNotFound,
)
from .layout import is_valid_cache_record_key, is_valid_ledger_key, is_valid_upload_id
from .resumable_hash import ResumableHash, available as resumable_hash_available
from .s3_bucket import ensure_bucket
from .s3_leases import LEASE_SECONDS, Lease, is_live
from .s3_ledger import S3Ledger
from .s3_objects import SMALL_REQUEST_SECONDS, Bucket, Conflict, S3Location

LOCK_WAIT_SECONDS = 30.0
COLLECTOR_LOCK_WAIT_SECONDS = 60.0
# The collector's leases (gc/running, gc/exclusive, registered guards): a stall must last
# this long before another instance may take over.
COLLECTOR_LEASE_SECONDS = 60.0
# An unregistered guard looks again (is a collection running?) before a write that refers
# to content once this long has passed since it looked.
GUARD_RECHECK_SECONDS = 5.0
# A collection waits this long after it starts before it reads the store: longer than the
# recheck time plus the longest a small request can take (retries included).
GUARD_SETTLE_SECONDS = GUARD_RECHECK_SECONDS + 2 * SMALL_REQUEST_SECONDS + 5.0
# How long a "no collection is running" read is reused by later guards of this process.
RUNNING_CACHE_SECONDS = 0.5
PARALLEL_READS = 16
# Manifests (and other small blobs) kept in memory by digest, per process.
SMALL_BLOB_CACHE_BYTES = 64 << 20
# A pull's blob HEAD or GET may be answered from what this process saw of a blob link this
# recently (a delete by another instance shows after at most this long; a push never uses it).
RECENT_LINK_SECONDS = 5.0
RECENT_LINK_ENTRIES = 100_000
REPOSITORY_DELETE_STEPS = ("tags", "referrers", "revisions", "layers", "uploads", "cache")

log = logging.getLogger("kura.storage")


@dataclass
class _Guard:
    """One reference_guard in progress (per task)."""
    id: str = field(default_factory=lambda: uuidlib.uuid4().hex)
    looked_at: float = field(default_factory=time.monotonic)
    registered: bool = False
    lease: Lease | None = None
    journal_entries: int = 0
    noted_manifests: list = field(default_factory=list)
    noted_blobs: list = field(default_factory=list)


_current_guard: contextvars.ContextVar[_Guard | None] = contextvars.ContextVar("kura_s3_guard", default=None)
# Leases this task holds (repository locks, the collector's): a write checks none was lost.
_held_leases: contextvars.ContextVar[tuple[Lease, ...]] = contextvars.ContextVar("kura_s3_leases", default=())


# stamp_tags asks for at most this many tags with a HEAD each, more with one listing.
FEW_TAGS = 4


class S3Driver(StorageDriver):
    def __init__(self, location: S3Location, *, redirect: bool = False, redirect_seconds: int = 600,
                 guard_settle_seconds: float = GUARD_SETTLE_SECONDS, lease_seconds: float = LEASE_SECONDS,
                 collector_lease_seconds: float = COLLECTOR_LEASE_SECONDS):
        """`guard_settle_seconds` shorter than the default is for tests only: the recheck time
        shrinks with it, but requests are not faster for that."""
        self.location = location
        self.bucket = Bucket(location)
        self.redirect = redirect
        self.redirect_seconds = redirect_seconds
        self.guard_settle_seconds = guard_settle_seconds
        self.guard_recheck_seconds = min(GUARD_RECHECK_SECONDS, guard_settle_seconds / 4)
        self.lease_seconds = lease_seconds
        self.collector_lease_seconds = collector_lease_seconds
        self._resumable = resumable_hash_available()
        self._not_running_at = float("-inf")
        self._small_blobs = ContentCache(SMALL_BLOB_CACHE_BYTES)
        self._links = _RecentLinks(RECENT_LINK_SECONDS, RECENT_LINK_ENTRIES)

    def __repr__(self) -> str:
        return f"S3Driver({self.location!r})"

    async def open(self) -> bool:
        """Check that the bucket takes a write; create it first if it is missing (True then).
        The probe goes first, with whatever credentials obstore finds (keys, environment,
        instance or task roles): creating is only tried when the store says NoSuchBucket."""
        probe = f"tmp/probe-{uuidlib.uuid4().hex}"
        created = False
        try:
            await self.bucket.put(probe, b"")
        except StoreUnavailable as exc:
            if "NoSuchBucket" not in str(exc.__cause__ or exc):
                raise
            try:
                created = await ensure_bucket(self.location)
            except StoreUnavailable as refused:
                # Another instance may have created it meanwhile: then the probe now works.
                try:
                    await self.bucket.put(probe, b"")
                except StoreUnavailable:
                    raise refused from None
            else:
                await self.bucket.put(probe, b"")
        await self.bucket.delete([probe])
        return created

    async def close(self) -> None:
        # obstore's runtime may still be winding down a failed request's connections; a
        # process that exits at once can abort (seen: exit 134 right after a failed request).
        await asyncio.sleep(0.05)

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def _blob_key(digest: Digest) -> str:
        digest = Digest.parse(str(digest))
        return f"blobs/{digest.algorithm}/{digest.encoded[:2]}/{digest.encoded}"

    @staticmethod
    def _repo(name: str) -> str:
        if not is_valid_name(name):
            raise ValueError(f"invalid repository name {name!r}")
        return f"repositories/{name}/"

    def _layer_key(self, name: str, digest: Digest) -> str:
        digest = Digest.parse(str(digest))
        return f"{self._repo(name)}_layers/{digest.algorithm}/{digest.encoded}"

    def _revision_key(self, name: str, digest: Digest) -> str:
        digest = Digest.parse(str(digest))
        return f"{self._repo(name)}_manifests/revisions/{digest.algorithm}/{digest.encoded}"

    def _tags_prefix(self, name: str) -> str:
        return f"{self._repo(name)}_manifests/tags/"

    def _tag_key(self, name: str, tag: str) -> str:
        if not is_valid_tag(tag):
            raise ValueError(f"invalid tag {tag!r}")
        return self._tags_prefix(name) + tag

    def _referrers_prefix(self, name: str, subject: Digest) -> str:
        subject = Digest.parse(str(subject))
        return f"{self._repo(name)}_referrers/{subject.algorithm}/{subject.encoded}/"

    def _cache_key(self, name: str, key: str) -> str:
        if not is_valid_cache_record_key(key):
            raise ValueError(f"invalid cache record key {key!r}")
        return f"{self._repo(name)}_cache/{key}"

    @staticmethod
    def _session_key(uuid: str) -> str:
        return f"uploads/{uuid}"

    @staticmethod
    def _owner_index(owner: str | None) -> str:
        key = "anonymous" if owner is None else hashlib.sha256(owner.encode()).hexdigest()
        return f"upload-index/owner/{key}/"

    def _repository_index(self, name: str) -> str:
        self._repo(name)
        return f"upload-index/repository/{hashlib.sha256(name.encode()).hexdigest()}/"

    def _lease(self, key: str) -> Lease:
        return Lease(self.bucket, key, self.lease_seconds)

    # -- blobs ------------------------------------------------------------------------
    async def stat_blob(self, digest: Digest) -> BlobContent | None:
        info = await self.bucket.head(self._blob_key(digest))
        return None if info is None else BlobContent(digest, info.size)

    async def read_blob(self, digest: Digest, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        stream = await self.bucket.stream(self._blob_key(digest), start, length)
        if stream is None:
            raise BlobNotFound(str(digest))
        async for chunk in stream:
            yield chunk

    async def read_small_blob(self, digest: Digest, limit: int) -> bytes:
        # Content never changes under its digest: manifests read once are kept in memory.
        # (Whether a repository still holds one is asked of the store every time.)
        cached = self._small_blobs.get(digest)
        if cached is not None:
            if len(cached) > limit:
                raise TooLarge(limit)
            return cached
        found = await self.bucket.get_limited(self._blob_key(digest), limit)
        if found is None:
            raise BlobNotFound(str(digest))
        if isinstance(found, int):
            raise TooLarge(limit)
        self._small_blobs.put(digest, found)
        return found

    async def put_small_blob(self, data: bytes, digest: Digest) -> None:
        await self._before_reference_write()
        await self.bucket.put(self._blob_key(digest), data)
        self._small_blobs.put(digest, data)

    async def blob_url(self, digest: Digest) -> str | None:
        if not self.redirect:
            return None
        return await self.bucket.presign(self._blob_key(digest), self.redirect_seconds)

    # -- repository membership --------------------------------------------------------
    async def link_blob(self, repository: str, digest: Digest, size: int | None = None) -> None:
        # A fresh link object: a collection's grace period counts from now for the link, and
        # a young link keeps its blob (the blob object itself is not rewritten). It holds the
        # blob's size, so one GET answers "linked here, and how large" (stat_linked_blob).
        if size is None:
            info = await self.bucket.head(self._blob_key(digest))
            if info is None:
                raise BlobNotFound(str(digest))
            size = info.size
        await self._before_reference_write()
        await self.bucket.put(self._layer_key(repository, digest), f"{digest} {size}".encode())
        self._links.put(repository, digest, size)

    async def stat_linked_blob(self, repository: str, digest: Digest, *, recent_ok: bool = False) -> BlobContent | None:
        if recent_ok:
            size = self._links.get(repository, digest)
            if size is not None:
                return BlobContent(digest, size)
        # A collection removes links before the blobs they name, so a link means the blob.
        found = await self.bucket.get(self._layer_key(repository, digest))
        if found is None:
            return None
        _, _, size = found[0].decode(errors="replace").partition(" ")
        blob = BlobContent(digest, int(size)) if size.isdigit() else await self.stat_blob(digest)
        if blob is not None:
            self._links.put(repository, digest, blob.size)
        return blob

    async def unlink_blob(self, repository: str, digest: Digest) -> bool:
        self._links.drop(repository, digest)
        key = self._layer_key(repository, digest)
        if await self.bucket.head(key) is None:
            return False
        await self.bucket.delete([key])
        return True

    async def is_blob_linked(self, repository: str, digest: Digest) -> bool:
        return await self.bucket.head(self._layer_key(repository, digest)) is not None

    async def repositories_linking_blob(self, digest: Digest) -> list[str]:
        names = await self.list_repositories()
        linked = await _gather_limited([self.is_blob_linked(name, digest) for name in names])
        return [name for name, yes in zip(names, linked) if yes]

    async def link_manifest(self, repository: str, digest: Digest, media_type: str) -> None:
        await self._before_reference_write()
        record = json.dumps({"digest": str(digest), "mediaType": media_type}).encode()
        await self.bucket.put(self._revision_key(repository, digest), record)

    async def get_manifest_link(self, repository: str, digest: Digest) -> ManifestLink | None:
        found = await self.bucket.get(self._revision_key(repository, digest))
        if found is None:
            return None
        return ManifestLink(digest, json.loads(found[0])["mediaType"])

    async def unlink_manifest(self, repository: str, digest: Digest) -> bool:
        key = self._revision_key(repository, digest)
        if await self.bucket.head(key) is None:
            return False
        await self.bucket.delete([key])
        return True

    async def list_manifests(self, repository: str) -> list[ManifestLink]:
        prefix = f"{self._repo(repository)}_manifests/revisions/"
        digests = sorted(_stamped_under(await self.bucket.list_all(prefix), prefix), key=str)
        links = await _gather_limited([self.get_manifest_link(repository, digest) for digest in digests])
        return [link for link in links if link is not None]

    # -- tags -------------------------------------------------------------------------
    async def set_tag(self, repository: str, tag: str, digest: Digest) -> None:
        await self._before_reference_write()
        await self.bucket.put(self._tag_key(repository, tag), str(digest).encode())

    async def resolve_tag(self, repository: str, tag: str) -> Digest | None:
        found = await self.bucket.get(self._tag_key(repository, tag))
        return None if found is None else Digest.parse(found[0].decode())

    async def delete_tag(self, repository: str, tag: str) -> bool:
        key = self._tag_key(repository, tag)
        if await self.bucket.head(key) is None:
            return False
        await self.bucket.delete([key])
        return True

    async def list_tags(self, repository: str) -> list[str]:
        prefix = self._tags_prefix(repository)
        return sorted(info.key[len(prefix):] for info in await self.bucket.list_all(prefix)
                      if is_valid_tag(info.key[len(prefix):]))

    async def stamp_tags(self, repository: str, tags: Iterable[str]) -> dict[str, Stamped]:
        prefix = self._tags_prefix(repository)
        wanted = {tag for tag in tags if is_valid_tag(tag)}
        if len(wanted) <= FEW_TAGS:  # a HEAD each rather than listing every tag
            heads = await _gather_limited([self.bucket.head(prefix + tag) for tag in sorted(wanted)])
            infos = [info for info in heads if info is not None]
        else:
            infos = [info for info in await self.bucket.list_all(prefix) if info.key[len(prefix):] in wanted]
        contents = await _gather_limited([self.bucket.get(info.key) for info in infos])
        stamps = {}
        for info, found in zip(infos, contents):
            with contextlib.suppress(InvalidDigest, ValueError):
                if found is not None:
                    stamps[info.key[len(prefix):]] = Stamped(Digest.parse(found[0].decode()), info.mtime)
        return stamps

    # -- referrers --------------------------------------------------------------------
    async def add_referrer(self, repository: str, subject: Digest, descriptor: dict) -> None:
        await self._before_reference_write()
        referrer = Digest.parse(descriptor["digest"])
        key = self._referrers_prefix(repository, subject) + f"{referrer.algorithm}-{referrer.encoded}"
        await self.bucket.put(key, json.dumps(descriptor).encode())

    async def remove_referrer(self, repository: str, subject: Digest, referrer: Digest) -> None:
        referrer = Digest.parse(str(referrer))
        await self.bucket.delete([self._referrers_prefix(repository, subject) + f"{referrer.algorithm}-{referrer.encoded}"])

    async def list_referrers(self, repository: str, subject: Digest) -> list[Digest]:
        prefix = self._referrers_prefix(repository, subject)
        digests = []
        for info in await self.bucket.list_all(prefix):
            with contextlib.suppress(InvalidDigest):
                digests.append(Digest.parse(info.key[len(prefix):].replace("-", ":", 1)))
        return sorted(digests, key=str)

    async def read_referrer(self, repository: str, subject: Digest, referrer: Digest) -> dict | None:
        referrer = Digest.parse(str(referrer))
        found = await self.bucket.get(self._referrers_prefix(repository, subject) + f"{referrer.algorithm}-{referrer.encoded}")
        return None if found is None else json.loads(found[0])

    async def list_referrer_subjects(self, repository: str) -> list[Digest]:
        prefix = f"{self._repo(repository)}_referrers/"
        subjects = set()
        for info in await self.bucket.list_all(prefix):
            algorithm, _, rest = info.key[len(prefix):].partition("/")
            with contextlib.suppress(InvalidDigest):
                subjects.add(Digest.parse(f"{algorithm}:{rest.partition('/')[0]}"))
        return sorted(subjects, key=str)

    # -- repositories -----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def repository_lock(self, repository: str):
        key = f"locks/repository/{hashlib.sha256(repository.encode()).hexdigest()}"
        self._repo(repository)
        guard = _current_guard.get()
        while True:
            lease = self._lease(key)
            if not await lease.take(LOCK_WAIT_SECONDS):
                raise RepositoryBusy(repository)
            # The wait may have been long: a guard held around it looks again for a collection.
            # If one runs, the guard registers without holding the lock (the collector may
            # need it while it deletes), then the lock is taken again.
            try:
                relook = guard is not None and not guard.registered \
                    and time.monotonic() - guard.looked_at > self.guard_recheck_seconds \
                    and await self._running_now(guard)
            except BaseException:
                await asyncio.shield(self._release(lease))  # else its renewal would go on
                raise
            if not relook:
                break
            await self._release(lease)
            await self._register(guard)
            await self._journal(guard, guard.noted_manifests, guard.noted_blobs)
        token = _held_leases.set(_held_leases.get() + (lease,))
        try:
            yield
        finally:
            _held_leases.reset(token)
            await asyncio.shield(self._release(lease))

    async def _release(self, lease: Lease) -> None:
        try:
            await lease.release()
        except StoreUnavailable as exc:  # it expires by itself
            log.warning("could not release the lease %s: %s", lease.key, exc)

    async def repository_exists(self, repository: str) -> bool:
        folders, _ = await self.bucket.folders(self._repo(repository))
        return await self._holds_links(self._repo(repository), folders)

    async def _holds_links(self, top: str, folders: list[str]) -> bool:
        # Some stores (SeaweedFS) keep a folder after its last object is deleted: look inside.
        for part in ("_manifests", "_layers"):
            if part in folders and await self.bucket.any(f"{top}{part}/"):
                return True
        return False

    async def list_repositories(self) -> list[str]:
        names: list[str] = []
        pending = ["repositories/"]
        while pending:
            level = await _gather_limited([self.bucket.folders(prefix) for prefix in pending])
            candidates = [(prefix, folders) for prefix, (folders, _) in zip(pending, level) if prefix != "repositories/"]
            holding = await _gather_limited([self._holds_links(prefix, folders) for prefix, folders in candidates])
            names += [prefix[len("repositories/"):-1] for (prefix, _), yes in zip(candidates, holding) if yes]
            pending = [f"{prefix}{folder}/" for prefix, (folders, _) in zip(pending, level)
                       for folder in folders if not folder.startswith("_")]
        return sorted(names)

    # -- upload sessions --------------------------------------------------------------
    async def create_upload(self, repository: str, owner: str | None = None,
                            quota: UploadQuota | None = None) -> UploadInfo:
        quota = quota or UploadQuota()
        uuid = str(uuidlib.uuid4())
        started = time.time()
        indexes = [(self._repository_index(repository), quota.per_repository, "repository")]
        if quota.per_owner:
            indexes.append((self._owner_index(owner), quota.per_owner, "user"))
        session = {"repository": repository, "started_at": started, "owner": owner, "size": 0,
                   "chunks": [], "hash": self._new_hash_state()}
        # Index entries first (a session without them would go uncounted), then each capped
        # index is counted: an entry that finds its index over the cap withdraws. Two
        # sessions racing for the last place may both withdraw, never both stay.
        await asyncio.gather(*(self.bucket.put(prefix + uuid, b"") for prefix, _, _ in indexes))
        try:
            for prefix, limit, scope in indexes:
                if limit and await self._open_sessions(prefix, limit, quota.active_since) > limit:
                    raise TooManyUploads(scope, limit)
            await self.bucket.put(self._session_key(uuid), _json(session), create=True)
        except BaseException:
            await asyncio.shield(self.bucket.delete([prefix + uuid for prefix, _, _ in indexes]))
            raise
        return UploadInfo(uuid, repository, 0, started, owner)

    def _new_hash_state(self) -> dict | None:
        return ResumableHash("sha256").state() if self._resumable else None

    async def _open_sessions(self, prefix: str, limit: int, active_since: float) -> int:
        entries = await self.bucket.list_all(prefix)
        if len(entries) <= limit:
            return len(entries)
        # At the cap: look at each session (dropping entries whose session is gone).
        uuids = [entry.key[len(prefix):] for entry in entries]
        sessions = await _gather_limited([self.bucket.head(self._session_key(uuid)) for uuid in uuids])
        count = 0
        stale = []
        for uuid, entry, session in zip(uuids, entries, sessions):
            if session is None:
                if entry.mtime < time.time() - 60:
                    stale.append(entry.key)
                else:
                    count += 1  # being created right now (its session comes after the entry)
            elif session.mtime >= active_since:
                count += 1
        if stale:
            await self.bucket.delete(stale)
        return count

    async def _read_session(self, uuid: str) -> tuple[dict, str | None]:
        if not is_valid_upload_id(uuid):
            raise UploadNotFound(uuid)
        found = await self.bucket.get(self._session_key(uuid))
        if found is None:
            raise UploadNotFound(uuid)
        return json.loads(found[0]), found[1]

    async def get_upload(self, uuid: str) -> UploadInfo:
        session, _ = await self._read_session(uuid)
        return _upload_info(uuid, session)

    async def append_upload(self, uuid: str, chunks: AsyncIterable[bytes], *,
                            offset: int | None = None, length: int | None = None,
                            max_size: int | None = None) -> UploadInfo:
        session, etag = await self._read_session(uuid)
        start = session["size"]
        if offset is not None and offset != start:
            raise RangeMismatch(start)
        hasher = ResumableHash.resume(session["hash"], start) if session.get("hash") else None
        counter = _Counter(length, max_size, start, hasher)
        source = counter.wrap(chunks)
        first = await _first(source)
        if first is None:
            counter.finish()
            return _upload_info(uuid, session)
        chunk_key = f"upload-data/{uuid}/{len(session['chunks']):08d}-{uuidlib.uuid4().hex[:8]}"
        await self.bucket.put_body(chunk_key, _prepend(first, source), length)
        session["size"] = start + counter.received
        session["chunks"].append(chunk_key)
        session["hash"] = hasher.state() if hasher is not None else None
        try:
            await self.bucket.put(self._session_key(uuid), _json(session), if_match=etag)
        except BaseException as exc:
            # The write may have landed after all (a time-out after the store applied it):
            # the chunk goes only if the session does not name it.
            try:
                current = await asyncio.shield(self.bucket.get(self._session_key(uuid)))
            except StoreUnavailable:
                raise exc from None  # the chunk stays for the purge, which knows what is named
            if current is not None and chunk_key in json.loads(current[0]).get("chunks", []):
                return _upload_info(uuid, session)
            await asyncio.shield(self.bucket.delete([chunk_key]))
            if isinstance(exc, Conflict):
                if current is None:
                    raise UploadNotFound(uuid) from None
                raise UploadBusy(uuid) from None
            raise
        return _upload_info(uuid, session)

    async def put_blob(self, repository: str, digest: Digest, chunks: AsyncIterable[bytes], *,
                       length: int | None = None, max_size: int | None = None) -> BlobContent:
        self._repo(repository)  # validates the name before any byte is written
        counter = _Counter(length, max_size, 0, new_hasher(digest.algorithm), expected=digest)
        await self.bucket.put_body(self._blob_key(digest), counter.wrap(chunks, verify_at_end=True), length)
        await self._link_stored(repository, digest, counter.received)
        return BlobContent(digest, counter.received)

    async def commit_upload(self, uuid: str, digest: Digest, *, size: int | None = None) -> BlobContent:
        session, _ = await self._read_session(uuid)
        actual_size = session["size"]
        try:
            if size is not None and size != actual_size:
                raise SizeMismatch(size, actual_size)
            hasher = ResumableHash.resume(session["hash"], actual_size) if session.get("hash") else None
            target = self._blob_key(digest)
            if hasher is not None and hasher.name == digest.algorithm and len(session["chunks"]) <= 1:
                # Verified from the carried-forward digest: no byte read back.
                if hasher.hexdigest() != digest.encoded:
                    raise DigestMismatch(str(digest), f"{digest.algorithm}:{hasher.hexdigest()}")
                if session["chunks"]:
                    if not await self.bucket.copy(session["chunks"][0], target):
                        raise UploadNotFound(uuid)  # cancelled or purged by another instance meanwhile
                else:
                    await self.bucket.put(target, b"")
            else:
                # Several chunks (or a digest not carried forward): streamed into place,
                # hashed on the way; a mismatch aborts before anything appears at `target`.
                counter = _Counter(None, None, 0, new_hasher(digest.algorithm), expected=digest)
                await self.bucket.put_stream(target, counter.wrap(self._read_chunks(uuid, session["chunks"]),
                                                                  verify_at_end=True))
            await self._link_stored(session["repository"], digest, actual_size)
        except (RepositoryBusy, StoreUnavailable):
            raise  # busy or unreachable for now: the session stays, to be committed again
        except BaseException:
            await asyncio.shield(self._remove_session(uuid, session))
            raise
        await self._remove_session(uuid, session)
        return BlobContent(digest, actual_size)

    async def _read_chunks(self, uuid: str, keys: list[str]) -> AsyncIterator[bytes]:
        for key in keys:
            stream = await self.bucket.stream(key)
            if stream is None:
                raise UploadNotFound(uuid)  # cancelled or purged by another instance meanwhile
            async for chunk in stream:
                yield chunk

    async def _link_stored(self, repository: str, digest: Digest, size: int) -> None:
        """Link a blob just written, under the reference guard."""
        async with self.reference_guard():
            guard = _current_guard.get()
            if guard is not None and guard.registered and await self.bucket.head(self._blob_key(digest)) is None:
                # A running collection deleted an identical old blob as this one was written.
                raise StoreUnavailable("a garbage collection removed the blob as it was stored; push it again")
            await self.note_references(blobs=[digest])
            await self.link_blob(repository, digest, size)

    async def cancel_upload(self, uuid: str) -> None:
        session, _ = await self._read_session(uuid)
        await self._remove_session(uuid, session)

    async def _remove_session(self, uuid: str, session: dict) -> None:
        # The session object first: from then on it no longer exists for anyone.
        await self.bucket.delete([self._session_key(uuid)])
        keys = [key for key in session.get("chunks", []) if key.startswith(f"upload-data/{uuid}/")]
        with contextlib.suppress(ValueError):
            keys.append(self._repository_index(session["repository"]) + uuid)
        keys.append(self._owner_index(session.get("owner")) + uuid)
        await self.bucket.delete(keys)

    async def list_uploads(self) -> list[str]:
        uuids = (info.key[len("uploads/"):] for info in await self.bucket.list_all("uploads/"))
        return sorted(uuid for uuid in uuids if is_valid_upload_id(uuid))

    async def purge_uploads(self, older_than: float) -> int:
        purged = 0
        sessions = await self.bucket.list_all("uploads/")
        for info in sessions:
            uuid = info.key[len("uploads/"):]
            if not is_valid_upload_id(uuid) or info.mtime >= older_than:
                continue
            with contextlib.suppress(UploadNotFound, ValueError, KeyError, TypeError):
                session, _ = await self._read_session(uuid)
                await self._remove_session(uuid, session)
                purged += 1
        # Chunks of sessions that are gone (an append cut short by a crash).
        live = {info.key[len("uploads/"):] for info in sessions}
        orphans = [info.key for info in await self.bucket.list_all("upload-data/")
                   if info.key.split("/")[1] not in live and info.mtime < older_than]
        await self.bucket.delete(orphans)
        return purged

    # -- usage accounting and whole-repository removal ----------------------------------
    async def list_blob_links(self, repository: str) -> list[BlobLink]:
        prefix = f"{self._repo(repository)}_layers/"
        return [BlobLink(digest, mtime) for digest, mtime in _stamped_under(await self.bucket.list_all(prefix), prefix).items()]

    def usage_ledger(self, key: str) -> UsageLedger:
        if not is_valid_ledger_key(key):
            raise ValueError(f"invalid usage ledger key {key!r}")
        return S3Ledger(self.bucket, f"usage/{key}")

    async def delete_repository(self, repository: str) -> bool:
        if not await self.repository_exists(repository):
            return False
        self._links.clear()
        top = self._repo(repository)
        parts = {"tags": f"{top}_manifests/tags/", "referrers": f"{top}_referrers/",
                 "revisions": f"{top}_manifests/revisions/", "layers": f"{top}_layers/", "cache": f"{top}_cache/"}
        for step in REPOSITORY_DELETE_STEPS:
            if step == "uploads":
                # Sessions would link their blob into the repository again when committed.
                index = self._repository_index(repository)
                for entry in await self.bucket.list_all(index):
                    uuid = entry.key[len(index):]
                    with contextlib.suppress(UploadNotFound):
                        session, _ = await self._read_session(uuid)
                        await self._remove_session(uuid, session)
                    await self.bucket.delete([entry.key])
            else:
                await self.bucket.delete([info.key for info in await self.bucket.list_all(parts[step])])
        return True

    # -- the pull-through cache's bookkeeping ---------------------------------------------
    async def read_cache_record(self, repository: str, key: str) -> bytes | None:
        found = await self.bucket.get(self._cache_key(repository, key))
        return None if found is None else found[0]

    async def write_cache_record(self, repository: str, key: str, data: bytes) -> None:
        await self.bucket.put(self._cache_key(repository, key), data)

    async def list_cache_records(self, repository: str) -> dict[str, bytes]:
        prefix = f"{self._repo(repository)}_cache/"
        keys = [info.key for info in await self.bucket.list_all(prefix)]
        found = await _gather_limited([self.bucket.get(key) for key in keys])
        return {key[len(prefix):]: item[0] for key, item in zip(keys, found) if item is not None}

    async def delete_cache_record(self, repository: str, key: str) -> None:
        await self.bucket.delete([self._cache_key(repository, key)])

    # -- outboxes ---------------------------------------------------------------------
    @staticmethod
    def _outbox_prefix(outbox: str, folder: str = "pending") -> str:
        if not is_valid_outbox_name(outbox):
            raise ValueError(f"invalid outbox name {outbox!r}")
        return f"outbox/{outbox}/{folder}/"

    def _outbox_key(self, outbox: str, key: str, folder: str = "pending") -> str:
        if not is_valid_outbox_key(key):
            raise ValueError(f"invalid outbox record key {key!r}")
        return self._outbox_prefix(outbox, folder) + key

    async def append_outbox(self, outbox: str, data: bytes) -> str:
        key = new_outbox_key()
        await self.bucket.put(self._outbox_key(outbox, key), data)
        return key

    async def _outbox_records(self, prefix: str, limit: int | None) -> list[OutboxRecord]:
        keys: list[str] = []
        async for info in self.bucket.list(prefix):  # in key order: oldest first
            name = info.key[len(prefix):]
            if is_valid_outbox_key(name):
                keys.append(name)
                if limit is not None and len(keys) >= limit:
                    break
        found = await _gather_limited([self.bucket.get(prefix + key) for key in keys])
        return [OutboxRecord(key, item[0]) for key, item in zip(keys, found) if item is not None]

    async def pending_outbox(self, outbox: str, limit: int) -> list[OutboxRecord]:
        return await self._outbox_records(self._outbox_prefix(outbox), limit)

    async def remove_outbox(self, outbox: str, keys: list[str]) -> None:
        if keys:
            await self.bucket.delete([self._outbox_key(outbox, key) for key in keys])

    async def fail_outbox(self, outbox: str, key: str) -> None:
        source = self._outbox_key(outbox, key)
        found = await self.bucket.get(source)
        if found is None:
            return
        await self.bucket.put(self._outbox_key(outbox, key, "failed"), found[0])
        await self.bucket.delete([source])

    async def failed_outbox(self, outbox: str) -> list[OutboxRecord]:
        return await self._outbox_records(self._outbox_prefix(outbox, "failed"), None)

    @contextlib.asynccontextmanager
    async def outbox_lease(self, outbox: str):
        self._outbox_prefix(outbox)  # validates
        lease = self._lease(f"locks/outbox/{outbox}")
        if not await lease.take(0):
            yield None
            return
        try:
            yield _HeldLease(lease)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.abandon() if lease.lost else lease.release())

    # -- garbage collection -----------------------------------------------------------
    # No collection running (the common case): a guard costs one GET of gc/running (shared
    # by a process's guards for half a second). While one runs, a guard registers (a renewed
    # lease at gc/guards/<id>), stays out while the collector deletes (gc/exclusive), and
    # journals what it references (gc/journal/<id>-<n>). A collection waits GUARD_SETTLE_SECONDS
    # after it starts, and an unregistered guard looks again before any write that refers
    # to content once GUARD_RECHECK_SECONDS have passed since it looked: each such write
    # starts within the recheck time and ends within SMALL_REQUEST_SECONDS x 2 (retries
    # included), so it lands before the collection reads the store.
    @contextlib.asynccontextmanager
    async def reference_guard(self):
        guard = _Guard()
        if await self._collection_running(guard):
            await self._register(guard)
        token = _current_guard.set(guard)
        try:
            yield
        finally:
            _current_guard.reset(token)
            await asyncio.shield(self._leave(guard))

    async def _collection_running(self, guard: _Guard | None = None) -> bool:
        """Whether a collection runs. "No" is remembered for RUNNING_CACHE_SECONDS: a guard
        then counts as having looked when it was read."""
        now = time.monotonic()
        if now - self._not_running_at < min(RUNNING_CACHE_SECONDS, self.guard_recheck_seconds / 4):
            if guard is not None:
                guard.looked_at = self._not_running_at
            return False
        if guard is not None:
            guard.looked_at = now
        found = await self.bucket.get("gc/running")
        running = found is not None and is_live(found[0])
        if not running:
            self._not_running_at = now
        return running

    async def _running_now(self, guard: _Guard | None = None) -> bool:
        self._not_running_at = float("-inf")
        return await self._collection_running(guard)

    async def _register(self, guard: _Guard) -> None:
        """Register `guard` with the running collection, waiting while it deletes; but never
        while this task holds a repository lock (the collector may be waiting for it): then
        RepositoryBusy at once, and the client retries."""
        may_wait = not _held_leases.get()
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            lease = Lease(self.bucket, f"gc/guards/{guard.id}", self.collector_lease_seconds)
            if not await lease.take(LOCK_WAIT_SECONDS):
                raise RepositoryBusy("the store (registering with a garbage collection)")
            try:
                exclusive = await self.bucket.get("gc/exclusive")
            except BaseException:
                await asyncio.shield(lease.release())
                raise
            if exclusive is None or not is_live(exclusive[0]):
                guard.lease = lease
                guard.registered = True
                return
            await lease.release()
            if not may_wait or time.monotonic() > deadline:
                raise RepositoryBusy("the store (a garbage collection is deleting)")
            await asyncio.sleep(0.05)

    async def _before_reference_write(self) -> None:
        """Called before every write that makes something refer to content."""
        for lease in _held_leases.get():
            lease.check()
        guard = _current_guard.get()
        if guard is not None and guard.registered:
            guard.lease.check()  # a lapsed guard may not have been waited for by the collector
            return
        if guard is None or time.monotonic() - guard.looked_at <= self.guard_recheck_seconds:
            return
        if await self._running_now(guard):
            await self._register(guard)
            await self._journal(guard, guard.noted_manifests, guard.noted_blobs)

    async def _leave(self, guard: _Guard) -> None:
        if guard.registered:
            try:
                await guard.lease.release()
            except StoreUnavailable as exc:  # it expires by itself
                log.warning("could not release a reference guard: %s", exc)

    async def note_references(self, *, manifests=(), blobs=()) -> None:
        manifests, blobs = list(manifests), list(blobs)
        guard = _current_guard.get()
        if guard is None:
            if await self._running_now():
                await self._journal(_Guard(), manifests, blobs)
            return
        guard.noted_manifests += manifests
        guard.noted_blobs += blobs
        if not guard.registered and time.monotonic() - guard.looked_at > self.guard_recheck_seconds:
            if await self._running_now(guard):
                await self._register(guard)
        if guard.registered:
            await self._journal(guard, manifests, blobs)

    async def _journal(self, guard: _Guard, manifests: list, blobs: list) -> None:
        if not manifests and not blobs:
            return
        lines = [f"m {digest}" for digest in manifests] + [f"b {digest}" for digest in blobs]
        guard.journal_entries += 1
        await self.bucket.put(f"gc/journal/{guard.id}-{guard.journal_entries:06d}", "\n".join(lines).encode())

    @contextlib.asynccontextmanager
    async def collection(self):
        lease = Lease(self.bucket, "gc/running", self.collector_lease_seconds)
        if not await lease.take(0):
            yield None
            return
        try:
            # A journal, guards or exclusive flag a crashed collector left are discarded.
            await self.bucket.delete([info.key for info in await self.bucket.list_all("gc/journal/")]
                                     + [info.key for info in await self.bucket.list_all("gc/guards/")]
                                     + ["gc/exclusive"])
            # Operations that looked before gc/running existed finish their writes meanwhile.
            await asyncio.sleep(self.guard_settle_seconds)
            lease.check()
            yield _S3Collection(self, lease)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._end_collection(lease))

    async def _end_collection(self, lease: Lease) -> None:
        if lease.lost:
            await lease.abandon()  # another collector may have taken over: its state is its own
            return
        await self.bucket.delete([info.key for info in await self.bucket.list_all("gc/journal/")] + ["gc/exclusive"])
        await self.bucket.put("gc/last", repr(time.time()).encode())
        await lease.release()

    @contextlib.asynccontextmanager
    async def _exclusive(self, collection_lease: Lease):
        flag = Lease(self.bucket, "gc/exclusive", self.collector_lease_seconds)
        await self.bucket.delete(["gc/exclusive"])  # ours from an earlier phase, if its release failed
        if not await flag.take(COLLECTOR_LOCK_WAIT_SECONDS):
            raise RepositoryBusy("the store (another collector's delete flag)")
        try:
            deadline = time.monotonic() + COLLECTOR_LOCK_WAIT_SECONDS
            while True:
                guards = await self.bucket.list_all("gc/guards/")
                contents = await _gather_limited([self.bucket.get(info.key) for info in guards])
                if not any(found is not None and is_live(found[0]) for found in contents):
                    break
                if time.monotonic() > deadline:
                    raise RepositoryBusy("the store (references were being made for too long)")
                await asyncio.sleep(0.05)
            # Still the collector? (One that stalled past its lease has been replaced.)
            running = await self.bucket.get("gc/running")
            if running is None or _owner(running[0]) != collection_lease.owner:
                raise RepositoryBusy("the store (this collection lost its lease to another collector)")
            collection_lease.check()
            token = _held_leases.set(_held_leases.get() + (collection_lease, flag))
            try:
                yield
            finally:
                _held_leases.reset(token)
        finally:
            await asyncio.shield(flag.release())

    async def last_collection(self) -> float | None:
        found = await self.bucket.get("gc/last")
        try:
            return None if found is None else float(found[0])
        except ValueError:
            return None

    async def iter_blobs(self) -> AsyncIterator[StoredBlob]:
        async for info in self.bucket.list("blobs/"):
            parts = info.key.split("/")
            if len(parts) != 4 or not is_supported_algorithm(parts[1]) or parts[3][:2] != parts[2]:
                continue
            with contextlib.suppress(InvalidDigest):
                yield StoredBlob(Digest.parse(f"{parts[1]}:{parts[3]}"), info.size, info.mtime)

    async def snapshot_repository(self, repository: str) -> RepositorySnapshot:
        top = self._repo(repository)
        tag_infos, revisions, layers = await asyncio.gather(
            self.bucket.list_all(f"{top}_manifests/tags/"),
            self.bucket.list_all(f"{top}_manifests/revisions/"),
            self.bucket.list_all(f"{top}_layers/"))
        tag_infos = [info for info in tag_infos if is_valid_tag(info.key[len(f"{top}_manifests/tags/"):])]
        contents = await _gather_limited([self.bucket.get(info.key) for info in tag_infos])
        tags = {}
        for info, found in zip(tag_infos, contents):
            with contextlib.suppress(InvalidDigest, ValueError):
                if found is not None:
                    tags[info.key.rsplit("/", 1)[1]] = Stamped(Digest.parse(found[0].decode()), info.mtime)
        return RepositorySnapshot(repository, tags, _stamped_under(revisions, f"{top}_manifests/revisions/"),
                                  _stamped_under(layers, f"{top}_layers/"))

    async def unlink_blobs(self, links: list[tuple[str, Digest]]) -> None:
        for lease in _held_leases.get():
            lease.check()
        for name, digest in links:
            self._links.drop(name, digest)
        await self.bucket.delete([self._layer_key(name, digest) for name, digest in links])

    async def delete_blobs(self, digests: list[Digest]) -> None:
        for lease in _held_leases.get():
            lease.check()
        for digest in digests:
            self._small_blobs.drop(digest)
        await self.bucket.delete([self._blob_key(digest) for digest in digests])

    async def remove_repository_if_empty(self, repository: str) -> bool:
        top = self._repo(repository)
        async with self.repository_lock(repository):
            for part in ("_layers/", "_manifests/", "_referrers/"):
                if await self.bucket.any(top + part):
                    return False
            await self.bucket.delete([info.key for info in await self.bucket.list_all(top + "_cache/")])
        return True

    async def purge_temp(self, older_than: float) -> int:
        stale = [info.key for info in await self.bucket.list_all("tmp/") if info.mtime < older_than]
        await self.bucket.delete(stale)
        return len(stale)

    async def probe(self) -> None:
        key = f"tmp/probe-{uuidlib.uuid4().hex}"
        data = uuidlib.uuid4().bytes
        await self.bucket.put(key, data)
        try:
            back = await self.bucket.get(key)
        finally:
            await self.bucket.delete([key])
        if back is None or back[0] != data:
            raise StoreUnavailable(f"{key}: a probe object read back other bytes than were written")


class _S3Collection(Collection):
    def __init__(self, driver: S3Driver, lease: Lease):
        self._driver = driver
        self._lease = lease
        self._read: set[str] = set()

    def exclusive(self):
        return self._driver._exclusive(self._lease)

    async def read_journal(self) -> tuple[set[Digest], set[Digest]]:
        bucket = self._driver.bucket
        keys = [info.key for info in await bucket.list_all("gc/journal/") if info.key not in self._read]
        found = await _gather_limited([bucket.get(key) for key in keys])
        manifests: set[Digest] = set()
        blobs: set[Digest] = set()
        for key, item in zip(keys, found):
            self._read.add(key)
            if item is None:
                continue
            for line in item[0].decode(errors="replace").splitlines():
                kind, _, text = line.partition(" ")
                with contextlib.suppress(InvalidDigest):
                    (manifests if kind == "m" else blobs).add(Digest.parse(text))
        return manifests, blobs


class _RecentLinks:
    """(repository, digest) -> blob size, for RECENT_LINK_SECONDS after it was last seen."""

    def __init__(self, seconds: float, entries: int):
        self.seconds = seconds
        self.entries = entries
        self._seen: collections.OrderedDict[tuple[str, str], tuple[int, float]] = collections.OrderedDict()

    def get(self, repository: str, digest: Digest) -> int | None:
        found = self._seen.get((repository, str(digest)))
        if found is None or time.monotonic() - found[1] > self.seconds:
            return None
        return found[0]

    def put(self, repository: str, digest: Digest, size: int) -> None:
        key = (repository, str(digest))
        self._seen.pop(key, None)
        self._seen[key] = (size, time.monotonic())
        while len(self._seen) > self.entries:
            self._seen.popitem(last=False)

    def drop(self, repository: str, digest: Digest) -> None:
        self._seen.pop((repository, str(digest)), None)

    def clear(self) -> None:
        self._seen.clear()


class _Counter:
    """Counts (and hashes) a body as it streams to the store, enforcing the promised length
    and the size cap; with `expected`, raises DigestMismatch at the end, before the store
    completes the object."""

    def __init__(self, length, max_size, start, hasher, expected: Digest | None = None):
        self.length = length
        self.max_size = max_size
        self.start = start
        self.hasher = hasher
        self.expected = expected
        self.received = 0

    async def wrap(self, chunks: AsyncIterable[bytes], verify_at_end: bool = False) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if not chunk:
                continue
            self.received += len(chunk)
            if self.length is not None and self.received > self.length:
                raise SizeMismatch(self.length, self.received)
            if self.max_size is not None and self.start + self.received > self.max_size:
                raise TooLarge(self.max_size)
            if self.hasher is not None:
                self.hasher.update(chunk)
            yield chunk
        self.finish()
        if verify_at_end:
            actual = self.hasher.hexdigest()
            if actual != self.expected.encoded:
                raise DigestMismatch(str(self.expected), f"{self.expected.algorithm}:{actual}")

    def finish(self) -> None:
        if self.length is not None and self.received != self.length:
            raise SizeMismatch(self.length, self.received)


async def _first(source: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await source.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def _gather_limited(awaitables: list) -> list:
    semaphore = asyncio.Semaphore(PARALLEL_READS)

    async def one(awaitable):
        async with semaphore:
            return await awaitable

    return await asyncio.gather(*(one(a) for a in awaitables))


class _HeldLease(OutboxLease):
    def __init__(self, lease: Lease):
        self._lease = lease

    @property
    def lost(self) -> bool:
        return self._lease.lost


def _owner(data: bytes) -> str | None:
    try:
        return json.loads(data).get("owner")
    except (ValueError, AttributeError):
        return None


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _upload_info(uuid: str, session: dict) -> UploadInfo:
    return UploadInfo(uuid, session["repository"], session["size"], session["started_at"], session.get("owner"))


def _stamped_under(infos, prefix: str) -> dict[Digest, float]:
    """`<prefix><alg>/<hex>` objects -> their LastModified."""
    found = {}
    for info in infos:
        algorithm, _, encoded = info.key[len(prefix):].partition("/")
        with contextlib.suppress(InvalidDigest):
            found[Digest.parse(f"{algorithm}:{encoded}")] = info.mtime
    return found
