"""What the web UI keeps per application and per request."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

from .session import Session, Sessions
from .summaries import Summaries
from .usage_cache import UsageCache


class Fragments:
    """Rendered pieces of pages by what they show, least recently used dropped beyond `entries`."""

    def __init__(self, entries: int = 20_000):
        self.entries = entries
        self._items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._items[key] = value
        while len(self._items) > self.entries:
            self._items.popitem(last=False)


@dataclass
class UiState:
    sessions: Sessions
    summaries: Summaries
    usage: UsageCache
    rows: Fragments = field(default_factory=Fragments)


UI = web.AppKey("ui", UiState)
SESSION = web.RequestKey("ui_session", Session)
NEW_SESSION = web.RequestKey("ui_new_session", Session)
"""Set by a handler that signs in or out: the cookie to send instead of the current one."""
