"""`GET /v2/<name>/tags/list`."""

from aiohttp import web

from .context import repository, storage
from .errors import NameUnknown
from .pagination import paginate


async def list_tags(request: web.Request) -> web.Response:
    name = repository(request)
    store = storage(request)
    if not await store.repository_exists(name):
        raise NameUnknown(detail={"name": name})
    tags, headers = paginate(request, await store.list_tags(name))
    return web.json_response({"name": name, "tags": tags}, headers=headers)
