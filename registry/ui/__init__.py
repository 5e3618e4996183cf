"""The web UI at /ui/: server-rendered pages (Jinja2 templates in templates/, one CSS file and
a few lines of JavaScript in static/, no build step, nothing fetched from elsewhere).

Pages: `/ui/` repositories (search, pages), `/ui/r/<name>` its tags, `/ui/r/<name>/-/m/<tag or
digest>` one image or index; actions: `POST /ui/r/<name>/-/delete`, `/ui/login`, `/ui/logout`.
Repository names never hold a `-` path component, so `/-/` separates a name from the rest.
Mounted by make_app when `[ui] enabled`; the pages (views.py, with jinja2 and aiohttp_jinja2)
are imported on the first request for one, so a server nobody browses never loads them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from aiohttp import web

from storage import StorageError

from ..auth.controller import AUTH
from ..context import CONFIG, STORAGE
from .render import TEMPLATES, LazyTemplates
from .session import COOKIE, Session, Sessions
from .state import NEW_SESSION, SESSION, UI, UiState
from .summaries import Summaries
from .urls import cookie_settings
from .usage_cache import UsageCache

log = logging.getLogger("kura.ui")
HERE = Path(__file__).parent
NAME = "{repo:[a-z0-9][^?#]*?}"
SECURITY_HEADERS = {
    # Scripts and styles only from /ui/static/ (no inline code); no framing; no leaking URLs.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def setup(app: web.Application) -> None:
    """Mount the UI on the registry's application (after its storage is set)."""
    ui = web.Application(middlewares=[_session_middleware])
    ui[TEMPLATES] = LazyTemplates()
    ui[UI] = UiState(Sessions(app[CONFIG]), Summaries(app[STORAGE]), UsageCache(app[STORAGE]))
    ui.on_cleanup.append(_close)
    r = ui.router
    r.add_get("/", _page("repositories"))
    r.add_get("/login", _page("sign_in_form"))
    r.add_post("/login", _page("sign_in"))
    r.add_post("/logout", _page("sign_out"))
    r.add_static("/static/", HERE / "static", name="static")
    r.add_get(f"/r/{NAME}/-/m/{{reference:[^/]+}}", _page("image"))
    r.add_post(f"/r/{NAME}/-/delete", _page("delete_tag"))
    r.add_get(f"/r/{NAME}", _page("repository"))
    app.router.add_get("/ui", _to_root)  # before the sub-application, which would take it
    app.add_subapp("/ui/", ui)


def _page(name: str):
    """The handler `views.<name>`, imported on the first request."""
    async def handler(request: web.Request) -> web.StreamResponse:
        from . import views

        return await getattr(views, name)(request)
    handler.__name__ = name
    return handler


def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    from . import views

    return views.error_page(request, status, title, message)


async def _to_root(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("ui/")  # relative: right behind a proxy's path prefix too


async def _close(ui: web.Application) -> None:
    await ui[UI].usage.close()


@web.middleware
async def _session_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Read the session cookie (a new anonymous session when there is none, or it is forged,
    expired, or its user's password changed since), run the page, and send the cookie."""
    state = request.config_dict[UI]
    session = state.sessions.decode(request.cookies.get(COOKIE))
    if session is not None and session.user is not None:
        credentials = request.config_dict[AUTH].credentials
        if credentials is None or credentials.htpasswd.fingerprint(session.user) != session.fingerprint:
            session = None
    fresh = session is None
    request[SESSION] = session if session is not None else Session.start()
    if fresh:
        request[NEW_SESSION] = request[SESSION]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect after a form
            _finish(request, exc)
            raise
        response = _error_page(request, exc.status, exc.reason, _explain(exc.status))
    except StorageError as exc:
        log.error("web UI: %s %s: storage error: %s", request.method, request.path, exc)
        response = _error_page(request, 503, "Storage unavailable",
                               "The registry's storage could not be read; try again shortly.")
    _finish(request, response)
    return response


def _explain(status: int) -> str:
    return {404: "There is no such page.", 405: "That page does not take this kind of request."}.get(
        status, "The request could not be served.")


def _finish(request: web.Request, response: web.StreamResponse) -> None:
    new = request.get(NEW_SESSION)
    if new is not None:
        response.set_cookie(COOKIE, request.config_dict[UI].sessions.encode(new),
                            max_age=new.expires - int(time.time()), **cookie_settings(request))
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if "/static/" not in request.path:  # pages show what one viewer may see: never cached
        response.headers.setdefault("Cache-Control", "no-store")

