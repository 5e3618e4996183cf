"""Where the web UI is, as the browser sees it (behind a reverse proxy's path prefix too)."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from ..auth.controller import AUTH, public_base


def public(request: web.Request) -> str:
    auth = request.config_dict[AUTH].config
    return public_base(request, auth.trusted_proxies if auth is not None else frozenset())


def ui_root(request: web.Request) -> str:
    """The UI's URL path, without the trailing slash."""
    return urlsplit(public(request)).path + "/ui"


def here(request: web.Request, path_qs: bool = False) -> str:
    """This page's URL path (and query)."""
    return ui_root(request) + (request.path_qs if path_qs else request.path)[len("/ui"):]


def registry_host(request: web.Request) -> str:
    """What `docker pull` needs before the repository name: host, port and any path prefix."""
    parts = urlsplit(public(request))
    return parts.netloc + parts.path


def cookie_settings(request: web.Request) -> dict:
    return {"path": ui_root(request) + "/", "httponly": True, "samesite": "Strict",
            "secure": public(request).startswith("https:")}
