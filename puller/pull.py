"""`kura pull`: resolve, choose the platform, download every blob verified, record the image."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from ocispec import mediatypes as mt
from ocispec.digest import Digest, InvalidDigest, new_hasher
from ocispec.reference import Reference

from .credentials import Credentials
from .platform import Platform, choose, fits, runnable_entries
from .progress import Progress, Quiet
from .registries import Endpoint, Registries
from .store import Store
from .transport import RegistryClient, RegistryError, read_limited

MANIFEST_LIMIT = 4 << 20
CONFIG_LIMIT = 4 << 20
IMAGE_CONFIGS = {mt.OCI_CONFIG, mt.DOCKER_CONFIG}
CHUNK = 1 << 20
RESUME_ATTEMPTS = 5


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
class _Manifest:
    data: bytes
    media_type: str
    digest: Digest

    @property
    def document(self) -> dict:
        return json.loads(self.data)

    def descriptor(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": len(self.data), **extra}


async def fetch_manifest(client: RegistryClient, reference: str, expected: Digest | None,
                         report: Callable[[str], None] | None = None) -> _Manifest:
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
    if header_type in mt.SCHEMA1:
        raise RegistryError(f"{reference} is a Docker schema 1 image, which Kura does not support")
    try:
        document = json.loads(data)
    except ValueError:
        raise VerificationError(f"manifest {reference} is not JSON") from None
    if not isinstance(document, dict) or document.get("schemaVersion") == 1:
        raise RegistryError(f"{reference} is not a schema 2 / OCI manifest, which is all Kura supports")
    # The document's own mediaType is covered by the digest; the header is not.
    media_type = document.get("mediaType") or (header_type if header_type in mt.MANIFESTS else None) \
        or (mt.OCI_INDEX if "manifests" in document else mt.OCI_MANIFEST)
    if ("manifests" in document) != (media_type in mt.INDEXES) or media_type not in mt.MANIFESTS:
        raise VerificationError(f"manifest {reference}: media type {media_type} does not fit its content")
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
    return _Manifest(data, media_type, digest)


async def download_blob(client: RegistryClient, descriptor: dict, store: Store, progress: Progress) -> bool:
    """Fetch one blob into the store; False when it was already there. Verifies size and
    digest while streaming; resumes with Range after a broken transfer. A blob the registry
    does not have is tried at the descriptor's `urls` (without credentials)."""
    digest = Digest.parse(descriptor["digest"])
    size = descriptor["size"]
    name = str(digest).split(":", 1)[1][:12]
    if store.has_blob(digest, size):
        progress.done(name, "already in store")
        return False
    progress.start(name, size)
    scope = f"repository:{client.endpoint.repository}:pull"
    openers = [lambda headers: client.request("GET", client.repo_path(f"blobs/{digest}"), scope=scope,
                                              headers=headers, ok=(200, 206))]
    if descriptor.get("mediaType") in FOREIGN_LAYERS:
        for url in descriptor.get("urls") or []:
            if _allowed_url(url):
                openers.append(lambda headers, url=url: _plain_get(client.session, url, headers))
    temp = store.temp_path()
    try:
        for opener in openers:
            with open(temp, "wb") as out:
                hasher = await _receive(opener, out, size, digest, name, progress)
            if hasher is not None:
                break
        else:
            raise RegistryError(f"blob {digest} not found in {client.endpoint.host}/{client.endpoint.repository}")
        actual = f"{digest.algorithm}:{hasher.hexdigest()}"
        if actual != str(digest):
            raise VerificationError(f"digest mismatch for blob: expected {digest}, got {actual}")
        store.install(temp, digest)
        progress.done(name, "downloaded")
        return True
    finally:
        temp.unlink(missing_ok=True)


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
        if r.status not in (200, 206, 404):
            raise RegistryError(f"GET {url}: HTTP {r.status}")
        yield r


async def _receive(opener, out, size: int, digest: Digest, name: str, progress: Progress):
    """Stream the blob into `out`, resuming with Range; returns the hasher of what was
    written, or None when the source has no such blob."""
    hasher = new_hasher(digest.algorithm)
    written = 0
    for attempt in range(RESUME_ATTEMPTS):
        headers = {"Range": f"bytes={written}-"} if written else {}
        try:
            async with opener(headers) as r:
                if r.status == 404:
                    progress.advance(name, -written)
                    return None
                if written and r.status == 200:  # the server ignored Range: start over
                    out.seek(0)
                    out.truncate()
                    progress.advance(name, -written)
                    hasher, written = new_hasher(digest.algorithm), 0
                async for chunk in r.content.iter_chunked(CHUNK):
                    written += len(chunk)
                    if written > size:
                        raise VerificationError(f"blob {digest} is larger than the {size} bytes its descriptor promises")
                    await asyncio.to_thread(_write_and_hash, out, hasher, chunk)
                    progress.advance(name, len(chunk))
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError):
            pass  # resume below from `written`
        if written == size:
            return hasher
        await asyncio.sleep(0.2 * (attempt + 1))
    raise RegistryError(f"blob {digest}: transfer kept breaking at {written} of {size} bytes")


def _write_and_hash(out, hasher, chunk: bytes) -> None:
    out.write(chunk)
    hasher.update(chunk)


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
    manifests = [top]
    recorded = top
    if top.media_type in mt.INDEXES:
        if options.all_platforms:
            entries = runnable_entries(top.document)
        else:
            try:
                entries = [choose(top.document, options.platform)]
            except LookupError as exc:
                raise RegistryError(str(exc)) from None
        children = [await fetch_manifest(client, e["digest"], Digest.parse(e["digest"])) for e in entries]
        manifests += children
        if not options.all_platforms:
            recorded = children[0]
            manifests = children
    prefetched: dict[str, bytes] = {}
    if top.media_type not in mt.INDEXES and options.explicit_platform and not options.all_platforms:
        prefetched = await _require_platform(client, top, reference, options.platform)
    blobs: dict[str, dict] = {}
    for manifest in manifests:
        document = manifest.document
        if "manifests" not in document:  # by structure: the digest covers it, not a header
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
            return await download_blob(client, descriptor, store, options.progress)

    with store.pinned():
        results = await asyncio.gather(*[fetch(d) for d in blobs.values()])
        for manifest in manifests:
            store.put_bytes(manifest.data, manifest.digest)
        missing = [d for d in blobs if not store.has_blob(Digest.parse(d), blobs[d]["size"])]
        if missing:
            raise VerificationError(f"blobs missing after the pull: {', '.join(missing)}")
        descriptor = recorded.descriptor()
        if recorded is not top and (platform := _platform_of(top, recorded)):
            descriptor["platform"] = platform
        store.add(str(reference), descriptor)
        store.record_sources(list(blobs), client.endpoint.host, client.endpoint.repository)
    options.progress.close()
    return PullResult(reference, recorded.digest, recorded.media_type, descriptor,
                      downloaded=sum(results), reused=len(results) - sum(results))


async def _require_platform(client: RegistryClient, manifest: _Manifest, reference: Reference,
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
    offered = Platform.of({"platform": config}) if isinstance(config, dict) else None
    if offered is not None and not fits(offered, wanted):
        raise PlatformMismatch(f"{reference} is {offered} only; asked for {wanted}")
    return {str(digest): data}


class PlatformMismatch(RegistryError):
    pass


def _platform_of(index: _Manifest, child: _Manifest) -> dict | None:
    for entry in index.document.get("manifests", []):
        if entry.get("digest") == str(child.digest):
            return entry.get("platform")
    return None


__all__ = ["PullOptions", "PullResult", "pull", "fetch_manifest", "download_blob", "Endpoint"]
