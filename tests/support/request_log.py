"""Which client asked what: every request an in-process aiohttp registry receives
(`record_requests`), or those in the access log of a `kura serve` child (`requests_in_access_log`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

# aiohttp's default access log format, as `kura serve` writes it: ... "GET /v2/ HTTP/1.1" 200 ...
_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) ')


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str  # as sent, percent-encoding kept
    query: str  # raw query string, "" when none
    headers: CIMultiDict
    status: int

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def record_requests(app: web.Application) -> list[SeenRequest]:
    """Make `app` (not started yet) append each request it answers to the returned list."""
    seen: list[SeenRequest] = []

    @web.middleware
    async def recorder(request: web.Request, handler):
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            seen.append(SeenRequest(request.method, request.rel_url.raw_path, request.rel_url.raw_query_string,
                                    CIMultiDict(request.headers), status))

    app.middlewares.insert(0, recorder)  # outermost: sees what the client sent, and the final status
    return seen


def requests_in_access_log(text: str) -> list[SeenRequest]:
    """The requests of a `kura serve` log (their headers are not logged: left empty)."""
    found = []
    for match in _ACCESS_LINE.finditer(text):
        method, target, status = match.groups()
        path, _, query = target.partition("?")
        found.append(SeenRequest(method, path, query, CIMultiDict(), int(status)))
    return found
