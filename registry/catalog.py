"""`GET /v2/_catalog`: the repositories the caller may pull."""

from aiohttp import web

from .auth.controller import grant
from .context import storage
from .pagination import next_link, page_size, paginate


async def list_repositories(request: web.Request) -> web.Response:
    caller = grant(request)
    n = page_size(request)
    if n is None:
        visible = [name for name in await storage(request).list_repositories() if caller.may_list(name)]
        names, headers = paginate(request, visible)
        return web.json_response({"repositories": names}, headers=headers)
    # A page: the store is walked only as far as the page reaches (plus one name, to know
    # whether another page follows).
    names: list[str] = []
    more = False
    if n > 0:
        async for name in storage(request).iter_repositories(request.rel_url.query.get("last")):
            if not caller.may_list(name):
                continue
            if len(names) == n:
                more = True
                break
            names.append(name)
    headers = {}
    if more:
        headers["Link"] = next_link(request, n, names[-1])
    return web.json_response({"repositories": names}, headers=headers)
