"""Manifests through the cache: a tag is trusted for the proxy's TTL with no upstream request;
after it one HEAD revalidates it (HEADs do not count against Docker Hub's pull limit) and only
a changed digest costs a GET. A manifest by digest never changes: once stored it is served from
the store. An index is stored with every manifest it lists. When the upstream cannot answer,
what is cached is served (stale, with a warning); only what is not cached fails."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from ocispec import mediatypes as mt
from ocispec.digest import Digest, InvalidDigest
from puller.limits import MANIFEST_LIMIT
from puller.pull import FetchedManifest, VerificationError, verify_manifest
from puller.transport import AuthError, RateLimited, RegistryClient, RegistryError, read_limited
from storage import StorageDriver, StorageError
from storage.fsck import CACHE_ORIGIN_RECORD
from storage.manifests import put_cached_manifest

from ..errors import BadGateway, ManifestUnknown, TooManyRequests, Unavailable
from .routing import Route
from .upstream import Upstream

log = logging.getLogger("kura.proxy")

# What a lookup was (Recorder.cache_lookup): served with no upstream request, confirmed by a
# HEAD, served while the upstream failed, fetched.
HIT, REVALIDATED, STALE, MISS = "hit", "revalidated", "stale", "miss"
PULL_RECORD_SECONDS = 60.0  # how often a manifest's last-pulled time is written (per process)
CHILD_FETCHES = 4  # an index's manifests fetched at once
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class TagRecord:
    digest: Digest
    checked: float  # when the upstream last confirmed it


def tag_record_key(tag: str) -> str:
    return f"tag-{tag}"


def pulled_record_key(digest: Digest) -> str:
    return f"pulled-{digest.algorithm}-{digest.encoded}"


async def is_private(driver: StorageDriver, repository: str) -> bool:
    """A repository pushed before a proxy came to cover its name (the cache never filled it):
    served as it is, never filled, revalidated or evicted."""
    return await driver.read_cache_record(repository, CACHE_ORIGIN_RECORD) is None \
        and await driver.repository_exists(repository)


class UpstreamDown(Exception):
    """The upstream could not answer (unreachable, 5xx, rate limited, unverifiable): serve
    stale content if there is any. Carries the error to give a client when there is none."""

    def __init__(self, reason: str, error: Exception, unreachable: bool = False):
        super().__init__(reason)
        self.error = error
        self.unreachable = unreachable


class ManifestCache:
    def __init__(self, driver: StorageDriver, upstreams: dict[str, Upstream]):
        self.driver = driver
        self.upstreams = upstreams
        self._flights: dict[tuple, asyncio.Future] = {}
        self._pulled_written: dict[tuple[str, Digest], float] = {}
        self._background: set[asyncio.Task] = set()

    # -- what handlers call -----------------------------------------------------------
    async def refresh(self, route: Route, reference: Digest | str) -> None:
        """Make the store hold the manifest `reference` names in the route's repository, as
        fresh as the TTL asks. Raises the registry error a client should get."""
        recorder = self.upstreams[route.proxy.prefix].recorder
        try:
            result = await self._refresh(route, reference)
        except Exception:
            recorder.cache_lookup(route.proxy.name, "manifest", "miss")
            raise
        if result is not None:
            recorder.cache_lookup(route.proxy.name, "manifest", result)

    async def _refresh(self, route: Route, reference: Digest | str) -> str | None:
        """What the cache did (see Recorder.cache_lookup); None for a private repository."""
        local = route.local_name
        if isinstance(reference, Digest):
            if await self.driver.get_manifest_link(local, reference) is not None:
                return HIT
            if await is_private(self.driver, local):
                return None
            return await self._once(("digest", local, reference), lambda: self._fetch_by_digest(route, reference))
        record = await self._tag_record(local, reference)
        if record is not None and time.time() - record.checked < route.proxy.tag_ttl_seconds \
                and await self.driver.resolve_tag(local, reference) == record.digest:
            return HIT  # trusted: not a single upstream request
        if record is None and await is_private(self.driver, local):
            return None
        return await self._once(("tag", local, reference), lambda: self._revalidate(route, reference))

    async def note_pulled(self, route: Route, digest: Digest) -> None:
        """Remember when a manifest was last pulled (least recently pulled goes first)."""
        key = (route.local_name, digest)
        now = time.time()
        if now - self._pulled_written.get(key, 0.0) < PULL_RECORD_SECONDS:
            return
        self._pulled_written[key] = now
        if len(self._pulled_written) > 100_000:
            self._pulled_written.clear()
        self._in_background(self._write_pulled(route.local_name, digest, now))

    async def _write_pulled(self, repository: str, digest: Digest, when: float) -> None:
        try:
            await self.driver.write_cache_record(repository, pulled_record_key(digest),
                                                 json.dumps({"digest": str(digest), "at": when}).encode())
        except (OSError, StorageError) as exc:
            log.warning("cannot record a pull of %s@%s: %s", repository, digest, exc)

    async def drain(self) -> None:
        """Wait for the background fetches of index children (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        """Stop what is in flight (shutdown), before the upstream session closes."""
        pending = [*self._background, *self._flights.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- tags -------------------------------------------------------------------------
    async def _revalidate(self, route: Route, tag: str) -> str:
        local = route.local_name
        cached = await self.driver.resolve_tag(local, tag)
        if cached is not None and await self.driver.get_manifest_link(local, cached) is None:
            cached = None
        record = await self._tag_record(local, tag)
        if record is not None and cached == record.digest and time.time() - record.checked < route.proxy.tag_ttl_seconds:
            return HIT  # another request of this process revalidated it meanwhile
        upstream = self.upstreams[route.proxy.prefix]
        client = upstream.client(route.upstream_name)
        if cached is not None and upstream.down:
            log.warning("serving %s:%s from the cache without revalidation (stale): %s was unreachable "
                        "moments ago", local, tag, route.proxy.remote)
            return STALE
        try:
            current = await _head_digest(client, tag) if cached is not None else None
            if current is not None and current == cached:
                await self._write_tag_record(local, tag, cached)
                return REVALIDATED
            fetched = await _get_manifest(client, str(current) if current else tag, current)
            if fetched is None:
                raise ManifestUnknown(f"{route.upstream_name}:{tag} does not exist on {route.proxy.remote}",
                                      detail={"tag": tag})
        except UpstreamDown as exc:
            upstream.failed(str(exc), exc.unreachable)
            if cached is not None:
                log.warning("serving %s:%s from the cache without revalidation (stale): %s", local, tag, exc)
                return STALE
            raise exc.error from None
        await self._store(route, fetched, tags=(tag,))
        await self._write_tag_record(local, tag, fetched.digest)
        return MISS

    async def _tag_record(self, repository: str, tag: str) -> TagRecord | None:
        data = await self.driver.read_cache_record(repository, tag_record_key(tag))
        try:
            document = json.loads(data) if data else None
            return TagRecord(Digest.parse(document["digest"]), float(document["checked"])) if document else None
        except (ValueError, KeyError, TypeError, InvalidDigest):
            return None

    async def _write_tag_record(self, repository: str, tag: str, digest: Digest) -> None:
        record = {"digest": str(digest), "checked": time.time()}
        await self.driver.write_cache_record(repository, tag_record_key(tag), json.dumps(record).encode())

    # -- digests ----------------------------------------------------------------------
    async def _fetch_by_digest(self, route: Route, digest: Digest, depth: int = 0) -> str:
        if await self.driver.get_manifest_link(route.local_name, digest) is not None:
            return HIT  # stored meanwhile (an index's children are fetched in the background)
        upstream = self.upstreams[route.proxy.prefix]
        try:
            fetched = await _get_manifest(upstream.client(route.upstream_name), str(digest), digest)
        except UpstreamDown as exc:
            upstream.failed(str(exc), exc.unreachable)
            raise exc.error from None
        if fetched is None:
            raise ManifestUnknown(f"{route.upstream_name}@{digest} does not exist on {route.proxy.remote}",
                                  detail={"digest": str(digest)})
        await self._store(route, fetched, depth=depth)
        return MISS

    async def _store(self, route: Route, fetched: FetchedManifest, tags: tuple[str, ...] = (),
                     depth: int = 0) -> None:
        local = route.local_name
        if await self.driver.read_cache_record(local, CACHE_ORIGIN_RECORD) is None:
            if await self.driver.repository_exists(local):
                raise ManifestUnknown(f"{local} is a private repository under the name of a proxy: the cache "
                                      "does not fill it")
            origin = {"remote": route.proxy.remote, "repository": route.upstream_name}
            await self.driver.write_cache_record(local, CACHE_ORIGIN_RECORD, json.dumps(origin).encode())
        await put_cached_manifest(self.driver, local, fetched.data, fetched.media_type, fetched.digest, tags=tags)
        if fetched.is_index and depth < MAX_INDEX_DEPTH:
            self._in_background(self._store_children(route, fetched, depth + 1))

    async def _store_children(self, route: Route, index: FetchedManifest, depth: int) -> None:
        """Every manifest an index lists (each platform's, attestations too), so a pull of
        another platform later is a hit; one a client asks for meanwhile joins its fetch."""
        entries = [entry for entry in index.document.get("manifests", [])
                   if isinstance(entry, dict) and not _is_attestation(entry)]
        limit = asyncio.Semaphore(CHILD_FETCHES)

        async def one(entry: dict) -> None:
            digest = Digest.parse(entry["digest"])
            async with limit:
                if await self.driver.get_manifest_link(route.local_name, digest) is not None:
                    return
                try:
                    await self._once(("digest", route.local_name, digest),
                                     lambda: self._fetch_by_digest(route, digest, depth))
                except Exception as exc:  # logged: the index itself is stored and served
                    log.warning("could not cache %s@%s, listed in index %s: %s", route.local_name, digest,
                                index.digest, getattr(exc, "text", None) or exc)

        await asyncio.gather(*(one(entry) for entry in entries))

    # -- plumbing ---------------------------------------------------------------------
    async def _once(self, key: tuple, work: Callable[[], Awaitable[str]]) -> str:
        """Single flight: concurrent callers for one key share one run of `work` (and its result)."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight

            def landed(_: asyncio.Future) -> None:
                self._flights.pop(key, None)
                if not flight.cancelled():
                    flight.exception()  # retrieved here: every waiter may have gone

            flight.add_done_callback(landed)
        return await asyncio.shield(flight)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _is_attestation(entry: dict) -> bool:
    """Buildkit's attestation manifests (provenance, SBOM) in an index: fetched when asked
    for, not ahead (each manifest GET costs a Docker Hub pull)."""
    annotations = entry.get("annotations")
    return isinstance(annotations, dict) and annotations.get("vnd.docker.reference.type") == "attestation-manifest"


async def _head_digest(client: RegistryClient, tag: str) -> Digest | None:
    """The digest the upstream's tag points at now, from a HEAD; None when it does not say
    (then a GET decides)."""
    try:
        async with client.request("HEAD", client.repo_path(f"manifests/{tag}"), scope=_pull_scope(client),
                                  headers={"Accept": mt.ACCEPT_MANIFESTS}, retry=False) as response:
            if response.status == 404:
                raise ManifestUnknown(f"{client.endpoint.repository}:{tag} does not exist on the upstream "
                                      f"{client.endpoint.host}", detail={"tag": tag})
            header = response.headers.get("Docker-Content-Digest")
    except RegistryError as exc:
        raise _down(client, exc) from None
    try:
        return Digest.parse(header) if header else None
    except InvalidDigest:
        return None


async def _get_manifest(client: RegistryClient, reference: str, expected: Digest | None) -> FetchedManifest | None:
    """The verified manifest, None when the upstream has no such manifest."""
    try:
        async with client.request("GET", client.repo_path(f"manifests/{reference}"), scope=_pull_scope(client),
                                  headers={"Accept": mt.ACCEPT_MANIFESTS}, retry=False) as response:
            if response.status == 404:
                return None
            data = await read_limited(response, MANIFEST_LIMIT, f"manifest {reference}")
            header_type = mt.strip_parameters(response.headers.get("Content-Type", ""))
            header_digest = response.headers.get("Docker-Content-Digest")
        return verify_manifest(reference, data, header_type, header_digest, expected)
    except RegistryError as exc:
        raise _down(client, exc) from None


def _pull_scope(client: RegistryClient) -> str:
    return f"repository:{client.endpoint.repository}:pull"


def _down(client: RegistryClient, exc: RegistryError) -> Exception:
    """What a failed upstream request means for a client that finds nothing cached."""
    where = f"the upstream {client.endpoint.host}"
    name = client.endpoint.repository
    if isinstance(exc, RateLimited):
        error = TooManyRequests(f"{where} is rate limiting this registry: {exc}",
                                headers={"Retry-After": str(int(exc.retry_after or 60))})
    elif isinstance(exc, AuthError):
        # What docker says of it too: Docker Hub answers 401 for a repository that does not exist.
        error = ManifestUnknown(f"{where} refused access to {name}: it does not exist there, or the proxy "
                                "needs credentials for it", detail={"upstream": str(exc)})
    elif isinstance(exc, VerificationError):
        error = BadGateway(f"{where} sent a manifest of {name} that failed verification: {exc}")
    else:
        error = Unavailable(f"{where} cannot be reached and {name} is not cached: {exc}")
        return UpstreamDown(str(exc), error, unreachable=True)
    return UpstreamDown(str(exc), error)
