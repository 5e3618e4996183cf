"""The one place where failures become spec error responses."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

import storage as st

from .context import config, range_header, upload_location, validate_name
from .errors import (
    BlobTooLarge,
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    HeadTooLarge,
    InsufficientStorage,
    RegistryError,
    RequestTooLarge,
    SizeInvalid,
    TooManyRequests,
    Unavailable,
    Unsupported,
)

log = logging.getLogger("kura.registry")
UPLOADS_RETRY_AFTER_SECONDS = 30  # a session frees when its upload ends: no better estimate


def _translate(exc: st.StorageError, request: web.Request) -> RegistryError:
    """Domain errors of the store -> wire errors (where the handler did not decide otherwise)."""
    if isinstance(exc, st.UploadNotFound):
        return BlobUploadUnknown(detail={"uuid": str(exc)})
    if isinstance(exc, st.UploadBusy):
        return BlobUploadInvalid("another request is writing to this upload session; retry")
    if isinstance(exc, st.RangeMismatch):
        error = BlobUploadInvalid(f"chunk is out of order: {exc}", detail={"offset": exc.current_size})
        error.status = 416
        uuid = request.match_info.get("uuid", "")
        error.headers = {"Range": range_header(exc.current_size),
                         "Location": upload_location(request.match_info.get("name", ""), uuid),
                         "Docker-Upload-UUID": uuid}
        return error
    if isinstance(exc, st.DigestMismatch):
        return DigestInvalid(str(exc), detail={"expected": exc.expected, "actual": exc.actual})
    if isinstance(exc, st.SizeMismatch):
        return SizeInvalid(str(exc), detail={"expected": exc.expected, "actual": exc.actual})
    if isinstance(exc, st.TooLarge):
        return BlobTooLarge(str(exc), detail={"limit": exc.limit})
    if isinstance(exc, st.TooManyUploads):
        return TooManyRequests(f"{exc}; finish or cancel an upload, or retry later",
                               detail={"scope": exc.scope, "limit": exc.limit},
                               headers={"Retry-After": str(UPLOADS_RETRY_AFTER_SECONDS)})
    if isinstance(exc, st.RepositoryBusy):
        return TooManyRequests("the repository is busy; retry", headers={"Retry-After": "1"})
    if isinstance(exc, st.BlobNotFound):
        return BlobUnknown(detail={"digest": str(exc)})
    if isinstance(exc, st.StorageFull):
        log.error("storage full: %s %s: %s", request.method, request.path, exc)
        if "/blobs/uploads/" in request.path:
            # The spec's code for an upload that "can no longer proceed": its session is gone.
            error = InsufficientStorage("the registry's storage is full: the upload was discarded; "
                                        "push again once space has been freed")
            error.code = "BLOB_UPLOAD_INVALID"
            return error
        return InsufficientStorage()
    if isinstance(exc, st.StoreUnavailable):
        log.error("storage unavailable: %s %s: %s", request.method, request.path, exc)
        # The detail (endpoint, bucket, key) is for the operator's log, not for clients.
        return Unavailable("the registry's storage is unavailable; retry later", headers={"Retry-After": "5"})
    log.exception("unexpected storage error", exc_info=exc)
    return RegistryError("internal storage error")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        name = request.match_info.get("name")
        if name is not None:
            validate_name(name)
        return await handler(request)
    except RegistryError as exc:
        return exc.response()
    except st.StorageError as exc:
        return _translate(exc, request).response()
    except web.HTTPMethodNotAllowed as exc:
        error = Unsupported(f"{request.method} is not supported on {request.path}",
                            headers={"Allow": ",".join(sorted(exc.allowed_methods))})
        return error.response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        return RequestTooLarge(f"request body exceeds {limit} bytes", detail={"limit": limit}).response()
    except web.HTTPNotFound:
        error = Unsupported(f"no such endpoint: {request.path}")
        error.status = 404
        return error.response()
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except ConnectionError as exc:
        if request.transport is not None and not request.transport.is_closing():
            raise  # not the client's connection that broke
        # The client went away mid-request (or was cut off for stalling): nobody will read an
        # answer; one line says what broke.
        stalled = getattr(request.protocol, "stalled", False)
        cut_off = getattr(request.protocol, "closed_because", None)
        client_gone(request, "during the request body", f"closed by us: {cut_off}" if cut_off else _what(exc))
        return web.Response(status=408 if stalled else 400)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return RegistryError("internal server error").response()


def _what(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def client_gone(request: web.Request, when: str, what: str | BaseException) -> None:
    """One INFO line for a client connection that broke mid-request (no traceback: it is
    routine, and nothing on our side failed)."""
    log.info("%s %s: client went away %s (%s)", request.method, request.path, when,
             _what(what) if isinstance(what, BaseException) else what)


def head_size(request: web.Request) -> int:
    """Bytes of the request line and headers, as sent."""
    line = len(request.method) + len(request.raw_path) + len("  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.raw_headers) + 2


@web.middleware
async def head_size_limit(request: web.Request, handler) -> web.StreamResponse:
    """Refuse a head larger than limits.max_header_bytes (the connection guard cuts off one
    that grows past it while incomplete; this catches one that arrived whole)."""
    limit = config(request).max_header_bytes
    if head_size(request) > limit:
        raise HeadTooLarge(f"request line and headers exceed {limit} bytes", detail={"limit": limit})
    return await handler(request)


@web.middleware
async def unauthenticated_body_limit(request: web.Request, handler) -> web.StreamResponse:
    """Outside /v2 (the token endpoint) a body is read before anyone is known: refuse one
    declared larger than the app's client_max_size before reading a byte of it. (/v2 handlers
    run only once authorized, and stream their bodies under their own limits.)"""
    limit = request.client_max_size
    if not request.path.startswith("/v2") and (request.content_length or 0) > limit:
        raise RequestTooLarge(f"request body exceeds {limit} bytes", detail={"limit": limit})
    return await handler(request)


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
