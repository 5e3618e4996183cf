"""What the web UI keeps per application and per request."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .session import Session, Sessions
from .summaries import Summaries
from .usage_cache import UsageCache


@dataclass
class UiState:
    sessions: Sessions
    summaries: Summaries
    usage: UsageCache


UI = web.AppKey("ui", UiState)
SESSION = web.RequestKey("ui_session", Session)
NEW_SESSION = web.RequestKey("ui_new_session", Session)
"""Set by a handler that signs in or out: the cookie to send instead of the current one."""
