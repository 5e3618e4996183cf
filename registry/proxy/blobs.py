"""Blobs through the cache: a miss is fetched from the upstream once, however many clients ask
for it at the same time, and streamed to each of them while it is written to the store.

The bytes go to a spool file that every waiting client reads behind the download, so a slow
client slows nobody else. The store verifies the digest before the blob enters it, and no client
is sent the blob's last byte before that: when the upstream sent something else, every client's
connection is cut short of its Content-Length, so no client takes bad bytes for good ones, and
nothing is stored."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from ocispec.digest import Digest
from puller.transport import AuthError, RateLimited, RegistryClient, RegistryError
from storage import BlobContent, DigestMismatch, SizeMismatch, StorageDriver, StorageError

from ..blob_response import blob_headers, serve_blob
from ..errors import BadGateway, BlobUnknown, TooManyRequests, Unavailable
from ..middlewares import client_gone
from .manifests import is_private
from .routing import Route
from .upstream import Upstream

log = logging.getLogger("kura.proxy")

CHUNK = 1 << 20  # bytes read from the upstream (and from the spool) at a time
SPOOL_PREFIX = "kura-proxy-"


@dataclass
class _Fetch:
    """One download in progress, shared by every client that asked for the blob meanwhile."""
    digest: Digest
    repository: str
    """Where the blob is stored once verified; others that joined link it when it is."""
    spool: Path
    size: int | None = None
    written: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    done: bool = False
    error: Exception | None = None
    """Set when the download failed: before the start, the error for the clients."""

    async def advance(self, written: int | None = None, *, done: bool = False,
                      error: Exception | None = None) -> None:
        async with self.changed:
            if written is not None:
                self.written = written
            self.done = self.done or done
            self.error = self.error or error
            self.changed.notify_all()


class BlobCache:
    def __init__(self, driver: StorageDriver, upstreams: dict[str, Upstream], spool_dir: Path | None = None,
                 on_filled: Callable[[Route], None] | None = None):
        self.driver = driver
        self.upstreams = upstreams
        self.spool_dir = spool_dir
        self.on_filled = on_filled
        """Told of every blob that entered the cache."""
        self._fetches: dict[Digest, _Fetch] = {}
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, request: web.Request, route: Route, digest: Digest) -> web.StreamResponse:
        """Answer a GET or HEAD for a blob the route's repository does not hold yet."""
        local = route.local_name
        if await is_private(self.driver, local):
            raise BlobUnknown(detail={"digest": str(digest)})
        upstream = self.upstreams[route.proxy.prefix]
        upstream.recorder.cache_lookup(route.proxy.name, "blob", "miss")
        client = upstream.client(route.upstream_name)
        fetch = self._fetches.get(digest)
        if request.method == "GET" and fetch is not None and fetch.repository == local:
            return await self._follow(request, fetch)
        if request.method == "HEAD" or fetch is not None or await self.driver.stat_blob(digest) is not None:
            # Only asked about, or another repository's (stored, or on its way): served when
            # this repository has it upstream too, as the upstream's HEAD (free of Docker
            # Hub's pull limit) says.
            size = await self._upstream_size(upstream, client, digest)
            if request.method == "HEAD":
                response = web.StreamResponse(status=200, headers=blob_headers_for(digest))
                response.content_length = size
                await response.prepare(request)
                await response.write_eof()
                return response
            stored = await self._link(local, digest)
            if stored is not None:
                return await serve_blob(request, stored, self.driver)
            fetch = self._fetches.get(digest)
            if fetch is not None:
                return await self._follow(request, fetch, link_into=local)
        fetch = self._fetches.get(digest) or self._start(upstream, client, route, digest)
        return await self._follow(request, fetch, link_into=local if fetch.repository != local else None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the download -----------------------------------------------------------------
    def _start(self, upstream: Upstream, client: RegistryClient, route: Route, digest: Digest) -> _Fetch:
        fd, name = tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=self.spool_dir)
        os.close(fd)
        fetch = _Fetch(digest, route.local_name, Path(name))
        self._fetches[digest] = fetch
        task = asyncio.ensure_future(self._download(upstream, client, route, fetch))
        self._tasks.add(task)

        def finished(_task: asyncio.Task) -> None:
            self._tasks.discard(_task)
            self._fetches.pop(digest, None)
            fetch.spool.unlink(missing_ok=True)  # readers hold it open
            fetch.started.set()

        task.add_done_callback(finished)
        return fetch

    async def _download(self, upstream: Upstream, client: RegistryClient, route: Route, fetch: _Fetch) -> None:
        digest = fetch.digest
        try:
            async with client.request("GET", client.repo_path(f"blobs/{digest}"), scope=_scope(client),
                                      retry=False) as response:
                if response.status == 404:
                    raise BlobUnknown(f"{route.upstream_name} on {route.proxy.remote} has no blob {digest}",
                                      detail={"digest": str(digest)})
                fetch.size = response.content_length
                fetch.started.set()
                with open(fetch.spool, "wb", buffering=0) as spool:
                    await self.driver.put_blob(route.local_name, digest, _tee(response, spool, fetch),
                                               length=fetch.size)
        except BlobUnknown as exc:
            await fetch.advance(error=exc)
        except (DigestMismatch, SizeMismatch) as exc:
            upstream.failed(f"blob {digest}: {exc}")
            log.error("upstream %s sent blob %s of %s that failed verification (%s): not stored, the "
                      "clients' downloads were cut short", route.proxy.remote, digest, route.upstream_name, exc)
            await fetch.advance(error=BadGateway(f"the upstream sent blob {digest} with other content: {exc}"))
        except RegistryError as exc:
            upstream.failed(f"blob {digest}: {exc}")
            await fetch.advance(error=_blob_error(client, digest, exc))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, StorageError) as exc:
            upstream.failed(f"blob {digest}: {exc}")
            log.warning("fetching blob %s of %s from %s failed: %s", digest, route.upstream_name,
                        route.proxy.remote, exc)
            await fetch.advance(error=Unavailable(f"fetching blob {digest} from the upstream failed: {exc}"))
        except asyncio.CancelledError:
            await fetch.advance(error=Unavailable("the registry is shutting down"))
            raise
        except Exception as exc:
            log.exception("fetching blob %s of %s failed", digest, route.upstream_name)
            await fetch.advance(error=Unavailable(f"fetching blob {digest} failed: {exc}"))
        else:
            await fetch.advance(done=True)
            if self.on_filled is not None:
                self.on_filled(route)

    async def _upstream_size(self, upstream: Upstream, client: RegistryClient, digest: Digest) -> int:
        try:
            async with client.request("HEAD", client.repo_path(f"blobs/{digest}"), scope=_scope(client),
                                      retry=False) as response:
                if response.status == 404:
                    raise BlobUnknown(detail={"digest": str(digest)})
                if response.content_length is None:
                    raise Unavailable(f"the upstream did not say the size of blob {digest}")
                return response.content_length
        except RegistryError as exc:
            upstream.failed(f"blob {digest}: {exc}")
            raise _blob_error(client, digest, exc) from None

    async def _link(self, repository: str, digest: Digest) -> BlobContent | None:
        """Link a stored blob into `repository`; None when it is not stored (any more)."""
        async with self.driver.reference_guard():
            stored = await self.driver.stat_blob(digest)  # under the guard: no collection deletes it now
            if stored is not None:
                await self.driver.note_references(blobs=[digest])
                await self.driver.link_blob(repository, digest)
            return stored

    # -- one client -------------------------------------------------------------------
    async def _follow(self, request: web.Request, fetch: _Fetch, link_into: str | None = None) -> web.StreamResponse:
        with open(fetch.spool, "rb", buffering=0) as spool:  # opened before the download can end
            await fetch.started.wait()
            if not fetch.size:  # unknown (known once all is here), or empty: no byte to hold back
                async with fetch.changed:
                    await fetch.changed.wait_for(lambda: fetch.done or fetch.error is not None)
            if fetch.error is not None:  # nothing sent yet: the error, in the spec's format
                raise fetch.error
            size = fetch.size if fetch.size is not None else fetch.written
            response = web.StreamResponse(status=200, headers=blob_headers_for(fetch.digest))
            response.content_length = size
            await response.prepare(request)
            sent = 0
            try:
                while sent < size:
                    async with fetch.changed:
                        await fetch.changed.wait_for(lambda: fetch.error is not None or _sendable(fetch, size) > sent)
                    if fetch.error is not None:
                        break
                    chunk = os.pread(spool.fileno(), min(_sendable(fetch, size) - sent, CHUNK), sent)
                    if not chunk:
                        break
                    await response.write(chunk)
                    sent += len(chunk)
            except ConnectionError as exc:
                client_gone(request, "during a blob fetched from the upstream", exc)
            if sent < size or fetch.error is not None:
                if request.transport is not None:
                    request.transport.abort()  # short of Content-Length: the client sees it failed
                return response
            if link_into is not None:
                await self._link(link_into, fetch.digest)
            await response.write_eof()
            return response


def _sendable(fetch: _Fetch, size: int) -> int:
    """How much of the blob may go to clients now: all of it once verified, else all but the
    last byte of what has arrived."""
    return fetch.written if fetch.done else min(fetch.written, size - 1)


async def _tee(response: aiohttp.ClientResponse, spool, fetch: _Fetch):
    """The upstream body, as the store receives it, written to the spool on the way (a write
    to the page cache: cheaper inline than a thread hop)."""
    written = 0
    async for chunk in response.content.iter_chunked(CHUNK):
        os.pwrite(spool.fileno(), chunk, written)
        written += len(chunk)
        await fetch.advance(written)
        yield chunk


def blob_headers_for(digest: Digest) -> dict[str, str]:
    return blob_headers(_Described(digest))


@dataclass(frozen=True)
class _Described:
    digest: Digest


def _scope(client: RegistryClient) -> str:
    return f"repository:{client.endpoint.repository}:pull"


def _blob_error(client: RegistryClient, digest: Digest, exc: RegistryError) -> Exception:
    where = f"the upstream {client.endpoint.host}"
    if isinstance(exc, RateLimited):
        return TooManyRequests(f"{where} is rate limiting this registry: {exc}",
                               headers={"Retry-After": str(int(exc.retry_after or 60))})
    if isinstance(exc, AuthError):
        return BlobUnknown(f"{where} refused access to {client.endpoint.repository}: {exc}",
                           detail={"digest": str(digest)})
    return Unavailable(f"{where} cannot be reached and blob {digest} is not cached: {exc}")
