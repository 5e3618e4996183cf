"""`GET /v2/_catalog`: the repositories the caller may pull."""

from aiohttp import web

from .auth.controller import grant
from .context import storage
from .pagination import paginate


async def list_repositories(request: web.Request) -> web.Response:
    caller = grant(request)
    visible = [name for name in await storage(request).list_repositories() if caller.may_list(name)]
    names, headers = paginate(request, visible)
    return web.json_response({"repositories": names}, headers=headers)
