"""`/v2/<name>/blobs/<digest>`: fetch, check and unlink blobs."""

from aiohttp import web

from .blob_response import serve_blob
from .context import config, parse_digest, repository, storage
from .errors import BlobUnknown, Unsupported
from .monitoring.recorder import recorder
from .notify import events as notify
from .proxy.routing import proxy_route
from .proxy.front import PROXY


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = parse_digest(request.match_info["digest"])
    store = storage(request)
    name = repository(request)
    blob = await store.stat_linked_blob(name, digest, recent_ok=True)
    route = proxy_route(request)
    if blob is None:
        if route is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        # Fetched from the upstream while it is sent: a pull once it was served.
        response = await request.app[PROXY].blobs.serve(request, route, digest)
        if request.method == "GET" and response.status in (200, 206):
            stored = await store.stat_blob(digest)
            size = stored.size if stored is not None else response.content_length
            await notify.emit(request, "pull", notify.blob(name, digest, size))
        return response
    if route is not None:
        recorder(request).cache_lookup(route.proxy.name, "blob", "hit")
    if request.method == "GET":
        await notify.emit(request, "pull", notify.blob(name, digest, blob.size))
    return await serve_blob(request, blob, store)


async def delete_blob(request: web.Request) -> web.Response:
    if not config(request).delete_enabled:
        raise Unsupported("deletes are disabled on this registry")
    digest = parse_digest(request.match_info["digest"])
    name = repository(request)
    if not await storage(request).unlink_blob(name, digest):
        raise BlobUnknown(detail={"digest": str(digest)})
    await notify.emit(request, "delete", notify.deleted(name, digest=digest))
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
