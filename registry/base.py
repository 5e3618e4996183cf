"""`GET /v2/`: the API version check."""

from aiohttp import web


async def api_version_check(request: web.Request) -> web.Response:
    return web.json_response({})
