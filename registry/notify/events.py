"""The events handlers report, in the reference registry's format (distribution 2.8's
`notifications.Event`, checked against Debian's docker-registry by tests/test_notify_reference.py):

    {"id", "timestamp", "action",
     "target": {"mediaType", "size", "digest", "length", "repository", "fromRepository", "url", "tag"},
     "request": {"id", "addr", "host", "method", "useragent"},
     "actor": {"name"}, "source": {"addr", "instanceID"}}

Fields without a value are left out, as the reference does (an anonymous actor is `{}`; a
delete names only the repository and the digest or tag). Handlers make one call,
`await emit(request, action, target)`, once the change has committed.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from ocispec.digest import Digest

from ..auth.controller import GRANT, public_base
from ..context import config, request_id
from .delivery import NOTIFIER

BLOB_MEDIA_TYPE = "application/octet-stream"  # what the reference names every blob


@dataclass(frozen=True)
class Target:
    repository: str
    digest: Digest | None = None
    media_type: str | None = None
    size: int | None = None
    tag: str | None = None
    from_repository: str | None = None
    kind: str | None = None
    """`manifests` or `blobs`: what the event's URL points at (none for a delete)."""


def manifest(repository: str, digest: Digest, media_type: str, size: int, tag: str | None = None) -> Target:
    return Target(repository, digest, media_type, size, tag, kind="manifests")


def blob(repository: str, digest: Digest, size: int, from_repository: str | None = None) -> Target:
    return Target(repository, digest, BLOB_MEDIA_TYPE, size, from_repository=from_repository, kind="blobs")


def deleted(repository: str, *, digest: Digest | None = None, tag: str | None = None) -> Target:
    return Target(repository, digest, tag=tag)


async def emit(request: web.Request, action: str, *targets: Target, user: str | None = None) -> None:
    """Queue one event per target for every endpoint that wants it (none: nothing to do).
    The actor is `user`, else whoever the request's grant names (a /v2 request's)."""
    notifier = request.config_dict.get(NOTIFIER)  # also from a sub-application (the web UI)
    if notifier is None:
        return
    if user is None and (granted := request.get(GRANT)) is not None:
        user = granted.user
    for target in targets:
        endpoints = notifier.endpoints_for(action, target.repository)
        if endpoints:
            event = _event(request, action, target, user, notifier.source)
            await notifier.enqueue(endpoints, json.dumps(event).encode())


def _event(request: web.Request, action: str, target: Target, user: str | None, source: dict) -> dict:
    return {
        "id": str(uuid.uuid4()),
        "timestamp": _rfc3339_nano(time.time_ns()),
        "action": action,
        "target": _target(request, target),
        "request": {"id": request_id(request), "addr": _peer(request), "host": request.host,
                    "method": request.method, "useragent": request.headers.get("User-Agent", "")},
        "actor": {"name": user} if user else {},
        "source": source,
    }


def _target(request: web.Request, target: Target) -> dict:
    out: dict = {}
    if target.media_type is not None:
        out["mediaType"] = target.media_type
    if target.size is not None:
        out["size"] = target.size
    if target.digest is not None:
        out["digest"] = str(target.digest)
    if target.size is not None:
        out["length"] = target.size
    out["repository"] = target.repository
    if target.from_repository:
        out["fromRepository"] = target.from_repository
    if target.kind is not None:
        base = public_base(request, config(request).auth.trusted_proxies)
        out["url"] = f"{base}/v2/{target.repository}/{target.kind}/{target.digest}"
    if target.tag:
        out["tag"] = target.tag
    return out


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return request.remote or ""


def _rfc3339_nano(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"
