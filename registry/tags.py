"""`GET /v2/<name>/tags/list`."""

from aiohttp import web

from .context import repository, storage
from .errors import NameUnknown
from .pagination import paginate
from .proxy.routing import proxy_route
from .proxy.front import PROXY


async def list_tags(request: web.Request) -> web.Response:
    name = repository(request)
    store = storage(request)
    route = proxy_route(request)
    if route is not None:  # the upstream's tags; the cached ones when it cannot answer
        response = await request.app[PROXY].list_tags(route, request.query)
        if response is not None:
            return response
    every = await store.list_tags(name)
    if not every and not await store.repository_exists(name):  # a repository with tags exists
        raise NameUnknown(detail={"name": name})
    tags, headers = paginate(request, every)
    return web.json_response({"name": name, "tags": tags}, headers=headers)
