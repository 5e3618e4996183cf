"""Serving blob bytes: single `Range` requests, ETag = digest, and sendfile() for local files."""

from __future__ import annotations

import asyncio
import os
import re

from aiohttp import web

from storage import BlobContent, StorageDriver

from .middlewares import client_gone

# [0-9], not \d: \d also matches other scripts' digits, which int() accepts. At most 19
# digits (any int64): int() refuses numbers of 4,300+ digits, and no blob is that large.
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for one satisfiable range; None to serve everything
    (no header, or one we may ignore per RFC 9110); "unsatisfiable" for a 416."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None  # multiple or malformed ranges: ignoring Range is allowed
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


def blob_headers(blob: BlobContent) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(blob.digest),
        "ETag": f'"{blob.digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
        "Content-Type": "application/octet-stream",
    }


async def serve_blob(request: web.Request, blob: BlobContent, driver: StorageDriver) -> web.StreamResponse:
    headers = blob_headers(blob)
    if request.headers.get("If-None-Match") in (headers["ETag"], str(blob.digest)):
        return web.Response(status=304, headers={k: headers[k] for k in ("Docker-Content-Digest", "ETag")})
    wanted = parse_range(request.headers.get("Range"), blob.size)
    if wanted == "unsatisfiable":
        headers["Content-Range"] = f"bytes */{blob.size}"
        return web.Response(status=416, headers=headers)
    status, start, end = 200, 0, blob.size - 1
    if isinstance(wanted, tuple):
        status, (start, end) = 206, wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
    count = end - start + 1

    if request.method == "GET" and count and (url := await driver.blob_url(blob.digest)) is not None:
        # The bytes flow from the object store (storage.s3.redirect), Range and all.
        return web.Response(status=307, headers={"Location": url, "Docker-Content-Digest": str(blob.digest)})
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = count
    if request.method == "HEAD" or count == 0:
        await response.prepare(request)
        await response.write_eof()
        return response
    try:
        if blob.local_path is not None:
            await _sendfile(request, response, blob, start, count)
        else:
            chunks = driver.read_blob(blob.digest, start, count)
            first = await anext(chunks, b"")  # a blob gone or a store down fails before the headers
            await response.prepare(request)
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
    except ConnectionError as exc:
        # Only writes to the client raise this here: its connection broke. The status already
        # sent stands in the access log.
        client_gone(request, "during the response", exc)
        if request.transport is not None:
            request.transport.abort()
    return response


async def _sendfile(request: web.Request, response: web.StreamResponse, blob: BlobContent,
                    start: int, count: int) -> None:
    with open(blob.local_path, "rb") as file:
        if os.fstat(file.fileno()).st_size < start + count:
            raise RuntimeError(f"blob {blob.digest} is shorter than recorded")
        await response.prepare(request)  # sends the headers at once
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        await asyncio.get_running_loop().sendfile(transport, file, start, count)
    await response.write_eof()
