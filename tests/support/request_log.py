"""Record every request an in-process aiohttp registry receives (to tell which client asked what)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict


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
