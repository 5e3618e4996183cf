"""`n` / `last` pagination with an RFC 5988 `Link` header, shared by tags and catalog."""

from __future__ import annotations

import bisect
import re
from urllib.parse import urlencode

from aiohttp import web

from .errors import PaginationNumberInvalid

_COUNT = re.compile(r"[0-9]{1,9}")


def page_size(request: web.Request) -> int | None:
    """The `n` asked for; None when none was."""
    raw_n = request.rel_url.query.get("n")
    if raw_n is None or raw_n == "":
        return None
    if not _COUNT.fullmatch(raw_n):
        raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw_n!r}")
    return int(raw_n)


def paginate(request: web.Request, items: list[str]) -> tuple[list[str], dict[str, str]]:
    """`items` must be sorted. Returns the page and the headers to send with it."""
    query = request.rel_url.query
    last = query.get("last")
    if last is not None:
        items = items[bisect.bisect_right(items, last):]
    n = page_size(request)
    if n is None:
        return items, {}
    if n == 0:
        return [], {}
    page = items[:n]
    headers = {}
    if len(items) > n:
        headers["Link"] = next_link(request, n, page[-1])
    return page, headers


def next_link(request: web.Request, n: int, last: str) -> str:
    return f'<{request.rel_url.path}?{urlencode({"n": n, "last": last})}>; rel="next"'
