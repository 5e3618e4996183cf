"""One log line per request, written once its response is complete (aiohttp calls AccessLogger
with the real elapsed time), and the request id every response carries as `X-Request-Id`."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .auth.controller import AUTH, GRANT, SIGNED_IN, client_address
from .context import request_id
from .logformat import CURRENT_REQUEST, RequestLine, scrub
from .proxy.routing import proxy_route

REQUEST_ID_HEADER = "X-Request-Id"


@web.middleware
async def request_context(request: web.Request, handler) -> web.StreamResponse:
    """The request's id, made before any handler can copy the request, and known to every
    record logged while it is answered."""
    token = CURRENT_REQUEST.set(request_id(request))
    try:
        return await handler(request)
    finally:
        CURRENT_REQUEST.reset(token)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REQUEST_ID_HEADER] = request_id(request)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access_log_class: the request line as a RequestLine record at INFO."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(RequestLine(request_fields(request, response, time), f"{version.major}.{version.minor}"))


def request_fields(request: web.BaseRequest, response: web.StreamResponse, elapsed: float) -> dict:
    # A request aiohttp could not parse is a BaseRequest: no route, no app, no grant.
    match = getattr(request, "_match_info", None)
    repository = digest = None
    client = request.remote
    if match is not None:
        name = match.get("name")
        if name:
            route = proxy_route(request)
            repository = route.local_name if route is not None else name
        digest = match.get("digest")
        if digest is None:
            reference = match.get("reference")
            if reference is not None and ":" in reference:
                digest = reference
        apps = match.apps
        auth = apps[0].get(AUTH) if apps else None
        proxies = auth.config.trusted_proxies if auth is not None and auth.config is not None else None
        if proxies and "X-Forwarded-For" in request.headers:  # else the peer is the client
            client = client_address(request, proxies).address
    if digest is None:
        digest = response.headers.get("Docker-Content-Digest")
    grant = request.get(GRANT)
    user = grant.user if grant is not None else request.get(SIGNED_IN)
    url = request.rel_url
    query = url.raw_query_string
    agent = request.headers.get("User-Agent")
    return {
        "request_id": request_id(request),
        "method": request.method,
        "path": f"{url.raw_path}?{scrub(query)}" if query else url.raw_path,
        "status": response.status,
        "repository": repository,
        "digest": digest,
        "user": user,
        "client": client or "-",
        "user_agent": scrub(agent) if agent else None,
        "bytes_sent": response.body_length,
        "bytes_received": request.content.total_bytes,
        "duration_ms": round(elapsed * 1000, 3),
    }
