"""`/v2/<name>/manifests/<reference>`: fetch, push and delete manifests."""

from __future__ import annotations

from aiohttp import web

from ocispec.digest import Digest
from ocispec.manifest import ManifestInvalid as ParseInvalid
from ocispec.manifest import ManifestUnsupported
from ocispec.names import is_valid_tag
from storage import ManifestNotFound, ManifestReferenceUnknown, manifests

from . import quota
from .context import config, parse_reference, repository, storage
from .notify import events as notify
from .proxy.routing import proxy_route
from .proxy.front import PROXY
from .errors import (
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    TagInvalid,
    Unsupported,
    UnsupportedMediaType,
)


def _reference_to_find(request: web.Request) -> Digest | str:
    """The reference of a GET, HEAD or DELETE. One that is neither a tag nor a digest cannot
    name a manifest: 404, as distribution (whose routes never match it). A PUT to it stays a
    TAG_INVALID, since there the client asked to create it."""
    text = request.match_info["reference"]
    if ":" not in text and not is_valid_tag(text):
        raise ManifestUnknown(detail={"reference": text})
    return parse_reference(text)


async def get_manifest(request: web.Request) -> web.Response:
    reference = _reference_to_find(request)
    route = proxy_route(request)
    if route is not None:
        await request.app[PROXY].manifests.refresh(route, reference)
    try:
        stored = await manifests.get_manifest(storage(request), repository(request), reference,
                                              manifests.READ_LIMIT)
    except ManifestNotFound:
        raise ManifestUnknown(detail={"reference": str(reference)}) from None
    if route is not None:
        await request.app[PROXY].manifests.note_pulled(route, stored.digest)
    etag = f'"{stored.digest}"'
    headers = {"Docker-Content-Digest": str(stored.digest), "ETag": etag}
    if request.headers.get("If-None-Match") in (etag, str(stored.digest)):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = stored.media_type
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(stored.data))
        return web.Response(status=200, headers=headers)
    await notify.emit(request, "pull", notify.manifest(
        repository(request), stored.digest, stored.media_type, len(stored.data),
        reference if isinstance(reference, str) else None))
    return web.Response(status=200, body=stored.data, headers=headers)


async def _read_manifest_body(request: web.Request) -> bytes:
    limit = config(request).max_manifest_bytes
    declared = request.headers.get("Content-Length")
    too_large = ManifestTooLarge(f"manifest exceeds the limit of {limit} bytes", detail={"limit": limit})
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _tags_from_query(request: web.Request) -> list[str]:
    tags = request.rel_url.query.getall("tag", [])
    for tag in tags:
        if not is_valid_tag(tag):
            raise TagInvalid(f"invalid tag {tag!r}", detail={"tag": tag})
    return tags


async def put_manifest(request: web.Request) -> web.Response:
    name = repository(request)
    reference = parse_reference(request.match_info["reference"])
    extra_tags = _tags_from_query(request) if isinstance(reference, Digest) else []
    data = await _read_manifest_body(request)
    async with quota.manifest_charged(request, name, data, reference):
        try:
            digest, manifest = await manifests.put_manifest(
                storage(request), name, data, request.headers.get("Content-Type"),
                digest=reference if isinstance(reference, Digest) else None,
                tags=tuple(extra_tags) if isinstance(reference, Digest) else (reference,))
        except ParseInvalid as exc:
            raise ManifestInvalid(str(exc)) from None
        except ManifestUnsupported as exc:
            raise UnsupportedMediaType(str(exc)) from None
        except ManifestReferenceUnknown as exc:
            if exc.kind == "blob":
                raise ManifestBlobUnknown(str(exc), detail={"digests": exc.digests}) from None
            error = ManifestUnknown(str(exc), detail={"digests": exc.digests})
            error.status = 400  # a flaw in the pushed document, as distribution answers it
            raise error from None
    tags = extra_tags if isinstance(reference, Digest) else [reference]
    await notify.emit(request, "push", *(notify.manifest(name, digest, manifest.media_type, len(data), tag)
                                         for tag in tags or [None]))
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": str(digest)}
    if manifest.subject is not None:
        headers["OCI-Subject"] = str(manifest.subject.digest)
    if extra_tags:
        headers["OCI-Tag"] = ",".join(extra_tags)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    if not config(request).delete_enabled:
        raise Unsupported("deletes are disabled on this registry")
    name = repository(request)
    store = storage(request)
    reference = _reference_to_find(request)
    if not await store.repository_exists(name):
        raise NameUnknown(detail={"name": name})
    if isinstance(reference, str):
        if not await manifests.delete_tag(store, name, reference):
            raise ManifestUnknown(detail={"tag": reference})
        await notify.emit(request, "delete", notify.deleted(name, tag=reference))
        return web.Response(status=202)
    try:
        tags = await manifests.delete_manifest(store, name, reference, manifests.READ_LIMIT)
    except ManifestNotFound:
        raise ManifestUnknown(detail={"digest": str(reference)}) from None
    # As the reference registry: the manifest, then each tag that went with it.
    await notify.emit(request, "delete", notify.deleted(name, digest=reference),
                      *(notify.deleted(name, tag=tag) for tag in tags))
    return web.Response(status=202)
