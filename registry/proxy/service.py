"""The pull-through cache: routing of names, the upstream clients, the manifest and blob
caches. Built only when a [[proxy]] is configured (what every request sees of it, and the
read-only rule for the names a proxy serves, is registry/proxy/front.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from puller.transport import RegistryError, read_limited
from storage import StorageDriver

from ..monitoring.recorder import Recorder
from . import eviction
from .blobs import BlobCache
from .config import Proxy
from .manifests import ManifestCache, is_private
from .routing import Route, Router
from .upstream import TIMEOUT, Upstream

log = logging.getLogger("kura.proxy")

TAG_LIST_LIMIT = 8 << 20
SIZE_CHECK_SECONDS = 10.0


class ProxyService:
    def __init__(self, proxies: tuple[Proxy, ...], driver: StorageDriver, spool_dir: Path | None = None,
                 collect: Callable[[], Awaitable[object]] | None = None, recorder: Recorder | None = None):
        """`collect`: one garbage collection, evicting first (when a cache grew past its cap);
        `recorder`: told of every upstream answer and failure (metrics)."""
        self.recorder = recorder or Recorder()
        self.router = Router(proxies)
        self.driver = driver
        self.spool_dir = spool_dir
        self.upstreams: dict[str, Upstream] = {}
        self.manifests = ManifestCache(driver, self.upstreams)
        self.blobs = BlobCache(driver, self.upstreams, spool_dir, on_filled=self._filled)
        self.collect = collect
        self._session: aiohttp.ClientSession | None = None
        self._size_check_wanted = asyncio.Event()
        self._size_checker: asyncio.Task | None = None

    def _filled(self, route: Route) -> None:
        if route.proxy.max_bytes and self.collect is not None:
            self._size_check_wanted.set()

    async def _check_sizes(self) -> None:
        """After blobs entered a capped cache: collect (evicting) when it is over its cap. At
        most one check per SIZE_CHECK_SECONDS: each walks the cached repositories."""
        while True:
            await self._size_check_wanted.wait()
            self._size_check_wanted.clear()
            try:
                for proxy in self.router.proxies:
                    if proxy.max_bytes:
                        size, images, _ = await eviction.cache_size(self.driver, self.router, proxy)
                        if size > proxy.max_bytes and len(images) > 1:  # the newest image always stays
                            log.info("proxy %s holds %d bytes, above max_bytes %d: collecting", proxy.label,
                                     size, proxy.max_bytes)
                            await self.collect()
                            break
            except Exception:
                log.exception("checking the size of the cache failed")
            await asyncio.sleep(SIZE_CHECK_SECONDS)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False,
                                              headers={"User-Agent": "kura-proxy"})
        for proxy in self.router.proxies:
            self.upstreams[proxy.prefix] = Upstream(proxy, self._session, self.recorder)
            log.info("proxy: caching %s as %s (tags trusted for %d s%s)", proxy.remote,
                     f"{proxy.prefix}/…" if proxy.prefix else "the root mirror", proxy.tag_ttl_seconds,
                     f", at most {proxy.max_bytes} bytes" if proxy.max_bytes else "")
        self._size_checker = asyncio.ensure_future(self._check_sizes())
        for name in await self.driver.list_repositories():
            route = self.router.route(name)
            if route is not None and route.local_name == name and await is_private(self.driver, name):
                log.warning("proxy: %s was pushed here, but the proxy %s now serves that name: it is served as it "
                            "is (read-only), never filled from the upstream nor evicted", name, route.proxy.label)

    async def close(self) -> None:
        if self._size_checker is not None:
            self._size_checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._size_checker
        await self.manifests.close()
        await self.blobs.close()
        if self._session is not None:
            await self._session.close()

    def status(self) -> list[dict]:
        return [upstream.status() for upstream in self.upstreams.values()]

    async def list_tags(self, route: Route, query: dict[str, str]) -> web.Response | None:
        """The upstream's tag list (one page, as asked), under the client's name; None when
        the upstream cannot answer (the caller lists what is cached)."""
        upstream = self.upstreams[route.proxy.prefix]
        client = upstream.client(route.upstream_name)
        params = {key: query[key] for key in ("n", "last") if key in query}
        path = client.repo_path("tags/list")
        if params:
            path += "?" + "&".join(f"{key}={aiohttp.helpers.quote(value, safe='')}" for key, value in params.items())
        try:
            async with client.request("GET", path, scope=f"repository:{route.upstream_name}:pull",
                                      retry=False) as response:
                if response.status == 404:
                    return None
                body = json.loads(await read_limited(response, TAG_LIST_LIMIT, "tag list"))
                link = response.headers.get("Link")
        except (RegistryError, ValueError) as exc:
            upstream.failed(f"tag list: {exc}")
            log.warning("listing the tags of %s on %s failed; answering with the cached tags: %s",
                        route.upstream_name, route.proxy.remote, exc)
            return None
        tags = body.get("tags") if isinstance(body, dict) else None
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            return None
        headers = {}
        if link:
            with contextlib.suppress(ValueError):
                headers["Link"] = _local_link(link, route)
        return web.json_response({"name": route.local_name, "tags": tags}, headers=headers)


def _local_link(link: str, route: Route) -> str:
    """The upstream's next-page Link, pointing at this registry's name for the repository."""
    start, end = link.index("<") + 1, link.index(">")
    target = link[start:end]
    query = target.partition("?")[2]
    return f'</v2/{route.local_name}/tags/list{"?" + query if query else ""}>; rel="next"'
