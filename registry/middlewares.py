"""The one place where failures become spec error responses."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

import storage as st

from .context import range_header, upload_location, validate_name
from .errors import (
    BlobTooLarge,
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    RegistryError,
    SizeInvalid,
    TooManyRequests,
    Unsupported,
)

log = logging.getLogger("kura.registry")


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
    if isinstance(exc, st.RepositoryBusy):
        return TooManyRequests("the repository is busy; retry", headers={"Retry-After": "1"})
    if isinstance(exc, st.BlobNotFound):
        return BlobUnknown(detail={"digest": str(exc)})
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
    except web.HTTPNotFound:
        error = Unsupported(f"no such endpoint: {request.path}")
        error.status = 404
        return error.response()
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return RegistryError("internal server error").response()


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
