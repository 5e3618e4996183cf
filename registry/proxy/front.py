"""What the request path needs of the pull-through cache, without loading the cache: the app
key its service is kept under, the middleware that marks and guards the names a proxy
serves, and `/proxy/status`. The service itself (registry/proxy/service.py, with the
upstream client from puller/) is imported only when a [[proxy]] is configured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..auth.controller import AUTH, grant
from ..auth.scopes import CATALOG
from ..errors import Denied
from .routing import ROUTE, Route

if TYPE_CHECKING:
    from .service import ProxyService


READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


def check_writable(route: Route | None, method: str, name: str) -> None:
    if route is not None and method not in READ_ONLY_METHODS:
        raise Denied(f"{name} is served by the pull-through cache of {route.proxy.remote} "
                     f"(proxy prefix {route.proxy.prefix!r}): it is read-only",
                     detail={"name": name, "proxy": route.proxy.prefix, "remote": route.proxy.remote})


PROXY: web.AppKey[ProxyService] = web.AppKey("proxy")


async def status(request: web.Request) -> web.Response:
    """`GET /proxy/status`: each upstream's requests, failures and last rate-limit headers, for
    whoever may read the catalog (failures name upstream repositories)."""
    await request.app[AUTH].controller.authorize(request, [CATALOG])
    return web.json_response({"proxies": request.app[PROXY].status()})


@web.middleware
async def proxy_middleware(request: web.Request, handler) -> web.StreamResponse:
    """After auth: mark requests for names a proxy serves, and refuse writes to them."""
    service = request.app.get(PROXY)
    name = request.match_info.get("name")
    if service is not None and name is not None:
        route = service.router.route(name, request.query.get("ns"))
        if route is not None and route.local_name != name and not grant(request).may_pull_alias(route.local_name):
            # Auth checked the name as written: `?ns=` must not reach a repository the caller
            # may not pull. Without it, the name is what it says.
            route = service.router.route(name)
            if route is not None and route.local_name != name:
                raise Denied(f"pulling {name} means pulling {route.local_name}, which you may not",
                             detail=[{"Type": "repository", "Name": route.local_name, "Action": "pull"}])
        if route is not None:
            check_writable(route, request.method, name)
            request[ROUTE] = route
    return await handler(request)
