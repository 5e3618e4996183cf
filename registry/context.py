"""Typed application state and the request-edge parsers every handler shares."""

from __future__ import annotations

import os

from aiohttp import web

from ocispec.digest import Digest, InvalidDigest
from ocispec.names import is_valid_name, is_valid_tag
from storage import StorageDriver

from .auth.controller import grant
from .config import Config
from .proxy.routing import proxy_route
from .errors import DigestInvalid, NameInvalid, TagInvalid

CONFIG = web.AppKey("config", Config)
STORAGE = web.AppKey("storage", StorageDriver)
REQUEST_ID = web.RequestKey("request_id", str)


def storage(request: web.Request) -> StorageDriver:
    return request.app[STORAGE]


def config(request: web.Request) -> Config:
    return request.app[CONFIG]


def request_id(request: web.Request) -> str:
    """The id of this request: in its log line, its `X-Request-Id` header and the events it
    causes. Made on first use, so every part of one request sees the same one."""
    value = request.get(REQUEST_ID)
    if value is None:
        # 128 random bits as 32 hex digits, like uuid4().hex but a quarter of its cost
        value = request[REQUEST_ID] = os.urandom(16).hex()
    return value


def principal(request: web.Request) -> str | None:
    """The signed-in user of this request, None when anonymous or without auth."""
    return grant(request).user


def repository(request: web.Request) -> str:
    """The repository a request is for: the `<name>` of the URL (the name middleware has
    validated it), or where the pull-through cache keeps it when a proxy serves that name."""
    route = proxy_route(request)
    return route.local_name if route is not None else request.match_info["name"]


def parse_digest(text: str | None) -> Digest:
    if not text:
        raise DigestInvalid("a digest is required")
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": text}) from None


def parse_reference(text: str) -> Digest | str:
    """A manifest reference: a digest when it has a colon, else a tag."""
    if ":" in text:
        return parse_digest(text)
    if not is_valid_tag(text):
        raise TagInvalid(f"invalid tag {text!r}", detail={"tag": text})
    return text


def validate_name(name: str) -> None:
    if not is_valid_name(name):
        raise NameInvalid(f"invalid repository name {name!r}", detail={"name": name})


def upload_location(name: str, uuid: str) -> str:
    return f"/v2/{name}/blobs/uploads/{uuid}"


def range_header(size: int) -> str:
    """The upload `Range` header: `0-<last byte offset>`, `0-0` when empty (as distribution)."""
    return f"0-{max(size - 1, 0)}"
