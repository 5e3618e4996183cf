"""`GET /v2/<name>/tags/list`."""

from aiohttp import web

from .context import repository, storage
from .errors import NameUnknown
from .pagination import paginate
from .proxy.routing import proxy_route
from .proxy.service import PROXY


async def list_tags(request: web.Request) -> web.Response:
    name = repository(request)
    store = storage(request)
    route = proxy_route(request)
    if route is not None:  # the upstream's tags; the cached ones when it cannot answer
        response = await request.app[PROXY].list_tags(route, request.query)
        if response is not None:
            return response
    if not await store.repository_exists(name):
        raise NameUnknown(detail={"name": name})
    tags, headers = paginate(request, await store.list_tags(name))
    return web.json_response({"name": name, "tags": tags}, headers=headers)
