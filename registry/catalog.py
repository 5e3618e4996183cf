"""`GET /v2/_catalog`."""

from aiohttp import web

from .context import storage
from .pagination import paginate


async def list_repositories(request: web.Request) -> web.Response:
    names, headers = paginate(request, await storage(request).list_repositories())
    return web.json_response({"repositories": names}, headers=headers)
