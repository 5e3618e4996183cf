"""`kura pull`: resolve, choose the platform, download every blob verified, record the image."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from ocispec import mediatypes as mt
from ocispec.digest import Digest, InvalidDigest, new_hasher
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest
from ocispec.reference import Reference

from .aiohttp_loader import aiohttp
from .credentials import Credentials
from .limits import CONFIG_LIMIT, MANIFEST_LIMIT
from .platform import Platform, fits, matching, platforms_in, runnable_entries, well_formed
from .progress import Progress, Quiet
from .registries import Endpoint, Registries
from .store import Store
from .transport import RegistryClient, RegistryError, cannot_resolve, printable, read_limited

IMAGE_CONFIGS = {mt.OCI_CONFIG, mt.DOCKER_CONFIG}
CHUNK = 1 << 20
RESUME_ATTEMPTS = 5
LOCK_POLL = 0.2  # seconds between looks at a blob another process is downloading


class VerificationError(RegistryError):
    pass


@dataclass
class PullOptions:
    platform: Platform = field(default_factory=Platform.host)
    explicit_platform: bool = False
    """--platform was given: a single-platform image must be that platform too."""
    all_platforms: bool = False
    jobs: int = 4
    progress: Progress = field(default_factory=Quiet)
    verbose: bool = False


@dataclass
class PullResult:
    reference: Reference
    digest: Digest
    media_type: str
    descriptor: dict
    downloaded: int = 0
    reused: int = 0


@dataclass
class FetchedManifest:
    data: bytes
    media_type: str
    digest: Digest
    document: dict

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES

    def descriptor(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": len(self.data), **extra}


async def fetch_manifest(client: RegistryClient, reference: str, expected: Digest | None,
                         report: Callable[[str], None] | None = None) -> FetchedManifest:
    scope = f"repository:{client.endpoint.repository}:pull"
    async with client.request("GET", client.repo_path(f"manifests/{reference}"), scope=scope,
                              headers={"Accept": mt.ACCEPT_MANIFESTS}) as r:
        if report and "ratelimit-limit" in r.headers:
            report(f"{client.endpoint.host} rate limit: {r.headers.get('ratelimit-remaining', '?')} remaining "
                   f"of {r.headers['ratelimit-limit']}")
        if r.status == 404:
            raise RegistryError(f"manifest {reference} not found in {client.endpoint.host}/{client.endpoint.repository}")
        data = await read_limited(r, MANIFEST_LIMIT, f"manifest {reference}")
        header_type = mt.strip_parameters(r.headers.get("Content-Type", ""))
        header_digest = r.headers.get("Docker-Content-Digest")
    return verify_manifest(reference, data, header_type, header_digest, expected)


def verify_manifest(reference: str, data: bytes, header_type: str, header_digest: str | None,
                    expected: Digest | None) -> FetchedManifest:
    """A manifest as a registry sent it, checked: schema 2 / OCI, media type fitting its
    content, well-formed descriptors, and its digest (the `expected` one, and the one the
    registry claimed in `header_digest`). Raises VerificationError or RegistryError."""
    if header_type in mt.SCHEMA1:
        raise RegistryError(f"{reference} is a Docker schema 1 image, which Kura does not support")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise VerificationError(f"manifest {reference} is not JSON (or is nested too deeply)") from None
    if not isinstance(document, dict) or document.get("schemaVersion") == 1:
        raise RegistryError(f"{reference} is not a schema 2 / OCI manifest, which is all Kura supports")
    # A null field is an absent one (Go reads it so, and so do registries): `"manifests": null`
    # does not make an image manifest an index.
    document = {key: value for key, value in document.items() if value is not None}
    if not isinstance(document.get("mediaType") or "", str):
        raise VerificationError(f"manifest {reference}: its mediaType is not a string")
    # The document's own mediaType is covered by the digest; the header is not.
    media_type = document.get("mediaType") or (header_type if header_type in mt.MANIFESTS else None) \
        or (mt.OCI_INDEX if "manifests" in document else mt.OCI_MANIFEST)
    if ("manifests" in document) != (media_type in mt.INDEXES) or media_type not in mt.MANIFESTS:
        raise VerificationError(f"manifest {reference}: media type {printable(media_type)} does not fit its content")
    _check_structure(reference, data, media_type, document)
    algorithm = expected.algorithm if expected else "sha256"
    digest = Digest.of_bytes(data, algorithm)
    if expected is not None and digest != expected:
        raise VerificationError(f"manifest digest mismatch: expected {expected}, got {digest}")
    if header_digest:
        try:
            claimed = Digest.parse(header_digest)
        except InvalidDigest:
            claimed = None
        if claimed and Digest.of_bytes(data, claimed.algorithm) != claimed:
            raise VerificationError(f"manifest digest mismatch: registry says {claimed}, content is {digest}")
    return FetchedManifest(data, media_type, digest, document)


def _check_structure(reference: str, data: bytes, media_type: str, document: dict) -> None:
    """Every descriptor well-formed (digest, integer size, lists where lists belong), so that
    nothing later trips over a registry's malformed document."""
    try:
        parse_manifest(data, media_type)
    except (ManifestInvalid, ManifestUnsupported, RecursionError) as exc:
        raise VerificationError(f"manifest {reference} is malformed: {exc}") from None
    if not all(well_formed(entry) for entry in document.get("manifests", [])):
        raise VerificationError(f"manifest {reference} is malformed: a platform's fields are not strings")


async def download_blob(client: RegistryClient, descriptor: dict, store: Store, progress: Progress,
                        report: Callable[[str], None] | None = None) -> bool:
    """Fetch one blob into the store; False when it was already there. Verifies size and
    digest while streaming. The bytes received so far live in the store's partial file for the
    blob, so a broken transfer, in this run or in an interrupted earlier one, resumes with
    Range (one that then fails verification is fetched once more from the start); another
    process downloading the same blob is waited for. A blob the registry does not have is
    tried at the descriptor's `urls` (without credentials)."""
    digest = Digest.parse(descriptor["digest"])
    size = descriptor["size"]
    name = str(digest).split(":", 1)[1][:12]
    if store.has_blob(digest, size):
        progress.done(name, "already in store")
        return False
    scope = f"repository:{client.endpoint.repository}:pull"
    openers = [lambda headers: client.request("GET", client.repo_path(f"blobs/{digest}"), scope=scope,
                                              headers=headers, ok=(200, 206, 416))]
    if descriptor.get("mediaType") in FOREIGN_LAYERS:
        for url in descriptor.get("urls") or []:
            if _allowed_url(url):
                openers.append(lambda headers, url=url: _plain_get(client.session, url, headers))
    waiting = False
    while True:
        with store.partial(digest) as file:
            if file is not None:
                if store.has_blob(digest, size):  # the process we waited for stored it
                    store.partial_path(digest).unlink()
                    progress.done(name, "already in store")
                    return False
                try:
                    await _download_into(_Partial(file, digest.algorithm), openers, digest, size, name,
                                         progress, report)
                except VerificationError:
                    store.partial_path(digest).unlink()  # those bytes are not worth resuming
                    raise
                except LookupError:
                    if not os.fstat(file.fileno()).st_size:
                        store.partial_path(digest).unlink(missing_ok=True)
                    raise RegistryError(f"blob {digest} not found in {client.endpoint.host}/"
                                        f"{client.endpoint.repository}") from None
                except BaseException:
                    if not os.fstat(file.fileno()).st_size:  # nothing received: nothing to resume
                        store.partial_path(digest).unlink(missing_ok=True)
                    raise
                file.flush()
                # Its fsync waits for the disk: off the event loop, the other downloads go on.
                await asyncio.to_thread(store.install, store.partial_path(digest), digest)
                progress.done(name, "downloaded")
                return True
        if not waiting:
            progress.message(f"{name}: waiting for another kura process that is downloading it")
            waiting = True
        await asyncio.sleep(LOCK_POLL)


class _Partial:
    """The bytes of one blob received so far: their file, running hash and count."""

    def __init__(self, file, algorithm: str):
        self.file, self.algorithm = file, algorithm
        self.hasher, self.written = new_hasher(algorithm), 0

    def rehash(self, size: int) -> None:
        """Take over what an earlier run left (a file longer than the blob is no prefix of it)."""
        self.file.seek(0)
        while chunk := self.file.read(CHUNK):
            self.hasher.update(chunk)
            self.written += len(chunk)
        if self.written > size:
            self.restart()

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hasher, self.written = new_hasher(self.algorithm), 0

    def append(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hasher.update(chunk)
        self.written += len(chunk)


async def _download_into(partial: _Partial, openers, digest: Digest, size: int, name: str, progress: Progress,
                         report: Callable[[str], None] | None) -> None:
    progress.start(name, size)
    if os.fstat(partial.file.fileno()).st_size:  # bytes an earlier run left
        await asyncio.to_thread(partial.rehash, size)
    resumed = partial.written
    if resumed == size:  # every byte is here already: no Range can ask for more (a registry answers 416)
        if f"{digest.algorithm}:{partial.hasher.hexdigest()}" == str(digest):
            progress.advance(name, size)
            return
        if report:
            report(f"{name}: the bytes kept from an earlier pull do not match {digest}; downloading it again")
        partial.restart()
        resumed = 0
    if resumed:
        progress.advance(name, resumed)
        if report:
            report(f"{name}: resuming at byte {resumed} of {size} (kept from an earlier pull)")
    while True:
        for opener in openers:
            if await _receive(opener, partial, size, digest, name, progress, report):
                break
        else:
            raise LookupError(digest)
        actual = f"{digest.algorithm}:{partial.hasher.hexdigest()}"
        if actual == str(digest):
            return
        if not resumed:
            raise VerificationError(f"digest mismatch for blob: expected {digest}, got {actual}")
        if report:
            report(f"{name}: the resumed download does not match {digest}; downloading it again from the start")
        progress.advance(name, -partial.written)
        partial.restart()
        resumed = 0


FOREIGN_LAYERS = {mt.DOCKER_FOREIGN_LAYER, "application/vnd.oci.image.layer.nondistributable.v1.tar",
                  "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                  "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"}


def _allowed_url(url: str) -> bool:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1"))


@contextlib.asynccontextmanager
async def _plain_get(session: aiohttp.ClientSession, url: str, headers: dict):
    """A foreign-layer URL: another host, so no registry credentials go with it."""
    async with session.get(url, headers=headers) as r:
        if r.status not in (200, 206, 404, 416):
            raise RegistryError(f"GET {url}: HTTP {r.status}")
        yield r


async def _receive(opener, partial: _Partial, size: int, digest: Digest, name: str, progress: Progress,
                   report: Callable[[str], None] | None) -> bool:
    """Stream the rest of the blob into `partial`, resuming with Range after a break; False
    when the source has no such blob."""
    for attempt in range(RESUME_ATTEMPTS):
        written = partial.written
        headers = {"Range": f"bytes={written}-"} if written else {}
        reason = "the transfer ended early"
        try:
            async with opener(headers) as r:
                if r.status == 404:
                    return False
                if r.status == 416:  # nothing left past `written`: those bytes are not this blob's start
                    if not written:
                        raise RegistryError(f"blob {digest}: the registry refused to send it (HTTP 416)")
                    progress.advance(name, -written)
                    partial.restart()
                    continue
                if written and (r.status != 206 or _range_start(r) not in (None, written)):
                    # Range ignored (or answered for other bytes): start over.
                    progress.advance(name, -written)
                    partial.restart()
                    if r.status == 206:
                        continue  # that body does not start at 0 either: ask again without Range
                # Each piece as it arrives (no re-joining into larger chunks), written and hashed
                # here: a thread hop per piece cost more than the work (measured: ~100 ms of CPU
                # per 77 MB image), and both calls release the GIL for large pieces anyway.
                async for chunk in r.content.iter_any():
                    if partial.written + len(chunk) > size:
                        raise VerificationError(f"blob {digest} is larger than the {size} bytes its descriptor promises")
                    partial.append(chunk)
                    progress.advance(name, len(chunk))
        except aiohttp.ClientConnectorDNSError as exc:
            raise RegistryError(cannot_resolve(exc)) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
        if partial.written == size:
            return True
        if report:
            report(f"{name}: {printable(reason)[:200]} at byte {partial.written} of {size}; resuming")
        await asyncio.sleep(0.2 * (attempt + 1))
    raise RegistryError(f"blob {digest}: transfer kept breaking at {partial.written} of {size} bytes")


def _range_start(response: aiohttp.ClientResponse) -> int | None:
    """Where a 206's Content-Range says its bytes start (None when it does not say)."""
    match = re.match(r"bytes\s+([0-9]{1,19})-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


async def pull(reference: Reference, store: Store, registries: Registries,
               credentials: Callable[[str], Credentials | None], options: PullOptions) -> PullResult:
    endpoints = registries.endpoints(reference)
    last_error: Exception | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        for endpoint in endpoints:
            client = RegistryClient(session, endpoint, credentials(endpoint.host),
                                    on_rate_limit=options.progress.message,
                                    on_retry=options.progress.message if options.verbose else None)
            try:
                return await _pull_from(client, reference, store, options)
            except RegistryError as exc:
                last_error = exc
                if endpoint is not endpoints[-1]:
                    options.progress.message(f"mirror {endpoint.host} failed ({exc}); trying the next source")
    raise last_error


async def _pull_from(client: RegistryClient, reference: Reference, store: Store, options: PullOptions) -> PullResult:
    report = options.progress.message if options.verbose else None
    top = await fetch_manifest(client, reference.reference, reference.digest, report)
    manifests, recorded, platform = [top], top, None
    if top.is_index:
        nested = _NestedIndexes(client)
        if options.all_platforms:
            manifests += await nested.everything(top)
        else:
            found = await nested.pick(top, options.platform)
            if found is None:
                available = ", ".join(sorted(nested.platforms)) or "none"
                raise RegistryError(f"no image for platform {options.platform}; available: {available}")
            recorded, platform = found
            manifests = [recorded]
    prefetched: dict[str, bytes] = {}
    if not top.is_index and options.explicit_platform and not options.all_platforms:
        prefetched = await _require_platform(client, top, reference, options.platform)
    blobs: dict[str, dict] = {}
    for manifest in manifests:
        document = manifest.document
        if "manifests" not in document:  # by structure: the digest covers it, not a header
            if document["config"]["size"] > CONFIG_LIMIT:
                raise VerificationError(f"the image config of {manifest.digest} is larger than {CONFIG_LIMIT} "
                                        "bytes; refusing it")
            for descriptor in [document["config"], *document.get("layers", [])]:
                blobs.setdefault(descriptor["digest"], descriptor)

    semaphore = asyncio.Semaphore(max(1, options.jobs))

    async def fetch(descriptor: dict) -> bool:
        digest = Digest.parse(descriptor["digest"])
        if str(digest) in prefetched and not store.has_blob(digest, descriptor["size"]):
            store.put_bytes(prefetched[str(digest)], digest)
            options.progress.done(digest.encoded[:12], "downloaded")
            return True
        async with semaphore:
            return await download_blob(client, descriptor, store, options.progress,
                                       options.progress.message if options.verbose else None)

    with store.pinned():
        results = await asyncio.gather(*[fetch(d) for d in blobs.values()])
        for manifest in manifests:
            store.put_bytes(manifest.data, manifest.digest)
        missing = [d for d in blobs if not store.has_blob(Digest.parse(d), blobs[d]["size"])]
        if missing:
            raise VerificationError(f"blobs missing after the pull: {', '.join(missing)}")
        descriptor = recorded.descriptor()
        if platform:
            descriptor["platform"] = platform
        store.add(str(reference), descriptor)
        store.record_sources(list(blobs), client.endpoint.host, client.endpoint.repository)
    options.progress.close()
    return PullResult(reference, recorded.digest, recorded.media_type, descriptor,
                      downloaded=sum(results), reused=len(results) - sum(results))


MAX_INDEX_DEPTH = 4  # indexes on the way to an image, the top one included
MAX_NESTED_INDEXES = 16  # indexes fetched below the top one, in all
MAX_WALKED_MANIFESTS = 128  # manifests fetched below the top one, indexes and images, in all


class _NestedIndexes:
    """Image indexes that hold indexes, as containerd and containers/image follow them: the
    platform is chosen at each level. Each digest is fetched and walked once, and the walk is
    bounded in depth, in indexes and in manifests, against a registry that nests or repeats
    without end."""

    def __init__(self, client: RegistryClient):
        self.client = client
        self.fetched = 0
        self.walked: dict[str, bool] = {}  # digest fetched -> is an index
        self.platforms: set[str] = set()  # every platform seen, for the error when none fits

    async def _child(self, entry: dict, depth: int) -> FetchedManifest:
        if len(self.walked) >= MAX_WALKED_MANIFESTS:
            raise RegistryError(f"image indexes lead to more than {MAX_WALKED_MANIFESTS} manifests; "
                                "refusing to follow them further")
        child = await fetch_manifest(self.client, entry["digest"], Digest.parse(entry["digest"]))
        self.walked[entry["digest"]] = child.is_index
        if child.is_index:
            self.fetched += 1
            if depth > MAX_INDEX_DEPTH or self.fetched > MAX_NESTED_INDEXES:
                raise RegistryError(f"image indexes nested more than {MAX_INDEX_DEPTH} deep (or more than "
                                    f"{MAX_NESTED_INDEXES} of them); refusing to follow them further")
        return child

    async def pick(self, index: FetchedManifest, wanted: Platform, depth: int = 1) -> tuple[FetchedManifest, dict | None] | None:
        """The image for `wanted` and its platform, or None. Entries for that platform come
        first; an index entry without a platform may hold it too."""
        self.platforms |= platforms_in(index.document)
        candidates = matching(index.document, wanted) + [
            e for e in runnable_entries(index.document) if Platform.of(e) is None and e.get("mediaType") in mt.INDEXES]
        for entry in candidates:
            was_index = self.walked.get(entry["digest"])
            if was_index or (was_index is not None and Platform.of(entry) is None):
                continue  # an index searched already (or being searched), or an image no use without a platform
            child = await self._child(entry, depth + 1)
            if not child.is_index:
                if Platform.of(entry) is not None:
                    return child, entry["platform"]
            elif (found := await self.pick(child, wanted, depth + 1)) is not None:
                return found
        return None

    async def everything(self, index: FetchedManifest, depth: int = 1) -> list[FetchedManifest]:
        """Every runnable manifest below `index`, nested indexes included, each once."""
        found = []
        for entry in runnable_entries(index.document):
            if entry["digest"] in self.walked:
                continue
            child = await self._child(entry, depth + 1)
            found.append(child)
            if child.is_index:
                found += await self.everything(child, depth + 1)
        return found


async def _require_platform(client: RegistryClient, manifest: FetchedManifest, reference: Reference,
                            wanted: Platform) -> dict[str, bytes]:
    """Refuse a single image of another platform than `wanted`, by its config's os, architecture
    and variant. Returns the config, verified, so that it is not fetched twice."""
    descriptor = manifest.document.get("config")
    if not isinstance(descriptor, dict) or descriptor.get("mediaType") not in IMAGE_CONFIGS:
        return {}  # an artifact: no platform to compare
    digest = Digest.parse(descriptor["digest"])
    scope = f"repository:{client.endpoint.repository}:pull"
    async with client.request("GET", client.repo_path(f"blobs/{digest}"), scope=scope) as r:
        if r.status == 404:
            raise RegistryError(f"config {digest} not found in {client.endpoint.host}/{client.endpoint.repository}")
        data = await read_limited(r, CONFIG_LIMIT, "image config")
    if Digest.of_bytes(data, digest.algorithm) != digest or len(data) != descriptor.get("size"):
        raise VerificationError(f"image config does not match {digest}")
    try:
        config = json.loads(data)
    except ValueError:
        raise VerificationError(f"image config {digest} is not JSON") from None
    offered = Platform.of_config(config)
    if offered is not None and not fits(offered, wanted):
        raise PlatformMismatch(f"{reference} is {offered} only; asked for {wanted}")
    return {str(digest): data}


class PlatformMismatch(RegistryError):
    pass


__all__ = ["PullOptions", "PullResult", "pull", "fetch_manifest", "download_blob", "Endpoint"]
