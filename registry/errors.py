"""Wire errors of the distribution API: one class per code, rendered in one middleware."""

from __future__ import annotations

import json

from aiohttp import web


class RegistryError(Exception):
    code = "UNKNOWN"
    status = 500
    message = "unknown error"

    def __init__(self, message: str | None = None, detail: object = None, headers: dict | None = None):
        super().__init__(message or self.message)
        self.text = message or self.message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"code": self.code, "message": self.text}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=json.dumps(self.body()).encode(),
                            content_type="application/json", headers=self.headers)


def _error(code: str, status: int, message: str) -> type[RegistryError]:
    return type(code.title().replace("_", ""), (RegistryError,),
                {"code": code, "status": status, "message": message})


BlobUnknown = _error("BLOB_UNKNOWN", 404, "blob unknown to registry")
BlobUploadInvalid = _error("BLOB_UPLOAD_INVALID", 400, "blob upload invalid")
BlobUploadUnknown = _error("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry")
DigestInvalid = _error("DIGEST_INVALID", 400, "provided digest did not match uploaded content")
ManifestBlobUnknown = _error("MANIFEST_BLOB_UNKNOWN", 400, "manifest references a manifest or blob unknown to registry")
ManifestInvalid = _error("MANIFEST_INVALID", 400, "manifest invalid")
ManifestUnknown = _error("MANIFEST_UNKNOWN", 404, "manifest unknown to registry")
NameInvalid = _error("NAME_INVALID", 400, "invalid repository name")
NameUnknown = _error("NAME_UNKNOWN", 404, "repository name not known to registry")
SizeInvalid = _error("SIZE_INVALID", 400, "provided length did not match content length")
Unauthorized = _error("UNAUTHORIZED", 401, "authentication required")
Denied = _error("DENIED", 403, "requested access to the resource is denied")
Unsupported = _error("UNSUPPORTED", 405, "the operation is unsupported")
TooManyRequests = _error("TOOMANYREQUESTS", 429, "too many requests")
Unavailable = _error("UNAVAILABLE", 503, "service unavailable")
BadGateway = _error("UNKNOWN", 502, "the upstream registry sent content that failed verification")
TagInvalid = _error("TAG_INVALID", 400, "manifest tag did not match URI")
RangeInvalid = _error("RANGE_INVALID", 416, "invalid content range")
PaginationNumberInvalid = _error("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested")


class ManifestTooLarge(RegistryError):
    code = "MANIFEST_INVALID"
    status = 413
    message = "manifest too large"


class BlobTooLarge(RegistryError):
    code = "SIZE_INVALID"
    status = 413
    message = "blob exceeds the registry's size limit"


class RequestTooLarge(RegistryError):
    code = "SIZE_INVALID"
    status = 413
    message = "request body too large"


class HeadTooLarge(RegistryError):
    code = "UNSUPPORTED"
    status = 431
    message = "request head too large"


class InsufficientStorage(RegistryError):
    """507: docker and skopeo print only the status line of a 5xx answer, so the status says
    it; and neither they nor Kura's client retry it (a disk does not empty in seconds)."""
    code = "UNKNOWN"
    status = 507
    message = "the registry's storage is full; retry once space has been freed"


class UnsupportedMediaType(RegistryError):
    code = "UNSUPPORTED"
    status = 415
    message = "unsupported manifest media type"
