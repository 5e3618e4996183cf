"""`/v2/<name>/blobs/<digest>`: fetch, check and unlink blobs."""

from aiohttp import web

from .blob_response import serve_blob
from .context import config, parse_digest, repository, storage
from .errors import BlobUnknown, Unsupported
from .monitoring.recorder import recorder
from .proxy.routing import proxy_route
from .proxy.front import PROXY


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = parse_digest(request.match_info["digest"])
    store = storage(request)
    blob = await store.stat_linked_blob(repository(request), digest, recent_ok=True)
    route = proxy_route(request)
    if blob is None:
        if route is not None:
            return await request.app[PROXY].blobs.serve(request, route, digest)
        raise BlobUnknown(detail={"digest": str(digest)})
    if route is not None:
        recorder(request).cache_lookup(route.proxy.name, "blob", "hit")
    return await serve_blob(request, blob, store)


async def delete_blob(request: web.Request) -> web.Response:
    if not config(request).delete_enabled:
        raise Unsupported("deletes are disabled on this registry")
    digest = parse_digest(request.match_info["digest"])
    if not await storage(request).unlink_blob(repository(request), digest):
        raise BlobUnknown(detail={"digest": str(digest)})
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
