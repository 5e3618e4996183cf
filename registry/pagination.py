"""`n` / `last` pagination with an RFC 5988 `Link` header, shared by tags and catalog."""

from __future__ import annotations

import bisect
import re
from urllib.parse import urlencode

from aiohttp import web

from .errors import PaginationNumberInvalid

_COUNT = re.compile(r"[0-9]{1,9}")


def paginate(request: web.Request, items: list[str]) -> tuple[list[str], dict[str, str]]:
    """`items` must be sorted. Returns the page and the headers to send with it."""
    query = request.rel_url.query
    last = query.get("last")
    if last is not None:
        items = items[bisect.bisect_right(items, last):]
    raw_n = query.get("n")
    if raw_n is None or raw_n == "":
        return items, {}
    if not _COUNT.fullmatch(raw_n):
        raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw_n!r}")
    n = int(raw_n)
    if n == 0:
        return [], {}
    page = items[:n]
    headers = {}
    if len(items) > n:
        link = f"{request.rel_url.path}?{urlencode({'n': n, 'last': page[-1]})}"
        headers["Link"] = f'<{link}>; rel="next"'
    return page, headers
