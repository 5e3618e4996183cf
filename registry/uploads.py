"""`/v2/<name>/blobs/uploads/`: monolithic, chunked and cross-repository-mount uploads."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import AsyncIterator

from aiohttp import web

from ocispec.digest import Digest
from ocispec.names import is_valid_name
from storage import DigestMismatch, SizeMismatch, TooLarge, UploadBusy, UploadInfo, UploadNotFound, UploadQuota

from . import quota
from .auth.controller import grant
from .context import config, parse_digest, principal, range_header, repository, storage, upload_location
from .errors import BlobUploadInvalid, BlobUploadUnknown, SizeInvalid
from .notify import events as notify

# [0-9], not \d: \d also matches other scripts' digits, which int() accepts. At most 19
# digits (any int64): int() refuses numbers of 4,300+ digits.
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/(?:[0-9]{1,19}|\*))?")
BODY_CHUNK = 64 * 1024
# The store batches what it receives before writing. When the client pauses this long, or
# at least this often, it is told to write out its batch (an empty chunk), so that a stalled
# or trickling client costs no buffered memory.
FLUSH_WHEN_IDLE_SECONDS = 0.05
FLUSH_AT_LEAST_EVERY_SECONDS = 1.0


def blob_location(name: str, digest: Digest) -> str:
    return f"/v2/{name}/blobs/{digest}"


def _session_headers(upload: UploadInfo) -> dict[str, str]:
    return {
        "Location": upload_location(upload.repository, upload.uuid),
        "Range": range_header(upload.size),
        "Docker-Upload-UUID": upload.uuid,
    }


def _committed(name: str, digest: Digest) -> web.Response:
    return web.Response(status=201, headers={"Location": blob_location(name, digest),
                                             "Docker-Content-Digest": str(digest)})


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in chunks, with an empty chunk whenever the store should flush."""
    content = request.content
    loop = asyncio.get_running_loop()
    flushed = loop.time()
    while True:
        try:
            async with asyncio.timeout(FLUSH_WHEN_IDLE_SECONDS):
                chunk = await content.read(BODY_CHUNK)
        except TimeoutError:
            yield b""
            flushed = loop.time()
            chunk = await content.read(BODY_CHUNK)
        if not chunk:
            return
        yield chunk
        if loop.time() - flushed > FLUSH_AT_LEAST_EVERY_SECONDS:
            yield b""
            flushed = loop.time()


def _content_length(request: web.Request) -> int | None:
    value = request.headers.get("Content-Length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise SizeInvalid("Content-Length must be a non-negative integer")
    return int(value)


def _max_size(request: web.Request) -> int | None:
    return config(request).max_blob_bytes or None


async def _session(request: web.Request) -> UploadInfo:
    """The upload named in the URL, only if it belongs to the URL's repository."""
    uuid = request.match_info["uuid"]
    try:
        upload = await storage(request).get_upload(uuid)
    except UploadNotFound:
        raise BlobUploadUnknown(detail={"uuid": uuid}) from None
    if upload.repository != repository(request) or upload.owner != principal(request):
        raise BlobUploadUnknown(detail={"uuid": uuid})
    return upload


async def start_upload(request: web.Request) -> web.Response:
    name = repository(request)
    store = storage(request)
    query = request.rel_url.query

    if "mount" in query:
        digest = parse_digest(query["mount"])
        blob = await store.stat_blob(digest)  # none: nothing to charge, _mount declines
        async with quota.charged(request, name, digest if blob else None, blob.size if blob else 0) as charge:
            mounted = await _mount(request, name, digest, query.get("from"))
            if not mounted:
                charge.void()
        if mounted:
            await notify.emit(request, "mount", notify.blob(name, digest, blob.size, query.get("from")))
            return _committed(name, digest)

    if "digest" in query:
        digest = parse_digest(query["digest"])
        length = _content_length(request)
        async with quota.charged(request, name, digest, length) as charge:
            stored = await store.put_blob(name, digest, _body(request), length=length,
                                          max_size=charge.cap(_max_size(request)))
        await notify.emit(request, "push", notify.blob(name, digest, stored.size))
        return _committed(name, digest)

    upload = await store.create_upload(name, owner=principal(request), quota=_quota(request))
    headers = _session_headers(upload)
    if config(request).chunk_min_length:
        headers["OCI-Chunk-Min-Length"] = str(config(request).chunk_min_length)
    return web.Response(status=202, headers=headers)


def _quota(request: web.Request) -> UploadQuota:
    settings = config(request)
    return UploadQuota(per_owner=settings.max_upload_sessions_per_user,
                       per_repository=settings.max_upload_sessions_per_repository,
                       active_since=time.time() - settings.upload_expiry_seconds)


async def _mount(request: web.Request, name: str, digest: Digest, source: str | None) -> bool:
    """Link an existing blob into `name`; False when it cannot (the caller starts an upload)."""
    store = storage(request)
    caller = grant(request)
    # Under the reference guard from finding the blob to linking it: a garbage collection
    # may be about to delete it as unreferenced; one that is running keeps what is noted.
    async with store.reference_guard():
        if await store.stat_blob(digest) is None:
            return False
        if source is not None:
            if not is_valid_name(source) or not caller.can("repository", source, "pull") \
                    or not await store.is_blob_linked(source, digest):
                return False
        elif not any(caller.can("repository", other, "pull")
                     for other in await store.repositories_linking_blob(digest)):
            return False
        await store.note_references(blobs=[digest])
        await store.link_blob(name, digest)
    return True


async def _append(request: web.Request, upload: UploadInfo, *, offset: int | None,
                  length: int | None) -> UploadInfo:
    return await storage(request).append_upload(upload.uuid, _body(request), offset=offset,
                                                length=length, max_size=_max_size(request))


def _chunk_range(request: web.Request) -> tuple[int | None, int | None]:
    """(offset, length) from Content-Range / Content-Length."""
    length = _content_length(request)
    header = request.headers.get("Content-Range")
    if header is None:
        return None, length
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise BlobUploadInvalid(f"malformed Content-Range {header!r}; expected <start>-<end>")
    start, end = int(match.group(1)), int(match.group(2))
    if length is not None and length != end - start + 1:
        raise SizeInvalid(f"Content-Length {length} does not match Content-Range {header}")
    return start, end - start + 1


async def upload_chunk(request: web.Request) -> web.Response:
    upload = await _session(request)
    offset, length = _chunk_range(request)
    upload = await _append(request, upload, offset=offset, length=length)
    return web.Response(status=202, headers=_session_headers(upload))


async def upload_status(request: web.Request) -> web.Response:
    upload = await _session(request)
    return web.Response(status=204, headers=_session_headers(upload))


async def finish_upload(request: web.Request) -> web.Response:
    upload = await _session(request)
    digest = parse_digest(request.rel_url.query.get("digest"))
    offset, length = _chunk_range(request)
    if request.can_read_body and length != 0:
        if upload.size == 0 and not offset:
            return await _finish_in_one(request, upload, digest, length)
        upload = await _append(request, upload, offset=offset, length=length)
    async with quota.charged(request, upload.repository, digest, upload.size, upload=upload.uuid):
        stored = await storage(request).commit_upload(upload.uuid, digest)
    await notify.emit(request, "push", notify.blob(upload.repository, digest, stored.size))
    return _committed(upload.repository, digest)


async def _finish_in_one(request: web.Request, upload: UploadInfo, digest: Digest, length: int | None) -> web.Response:
    """The whole blob in the closing PUT of an empty session: stored straight from the body,
    as a monolithic upload is (on S3, one object written instead of a chunk and its copy)."""
    store = storage(request)
    try:
        async with quota.charged(request, upload.repository, digest, length, upload=upload.uuid) as charge:
            stored = await store.put_blob(upload.repository, digest, _body(request), length=length,
                                          max_size=charge.cap(_max_size(request)))
    except (DigestMismatch, SizeMismatch, TooLarge):
        await _end_session(store, upload)  # as a failed commit ends it
        raise
    await _end_session(store, upload)
    await notify.emit(request, "push", notify.blob(upload.repository, digest, stored.size))
    return _committed(upload.repository, digest)


async def _end_session(store, upload: UploadInfo) -> None:
    with contextlib.suppress(UploadNotFound, UploadBusy):
        await store.cancel_upload(upload.uuid)


async def cancel_upload(request: web.Request) -> web.Response:
    upload = await _session(request)
    await storage(request).cancel_upload(upload.uuid)
    return web.Response(status=204)
