"""Count the S3 requests a registry makes: a loopback reverse proxy in front of the S3 port.

Point the registry at `CountingProxy.endpoint` instead of the S3 server. The proxy forwards every
request unchanged (the Host header included, so SigV4 signatures made for the proxy's address
still verify; SeaweedFS checks the Host it receives) and records the S3 operation of each one,
counted when the request arrives. It works the same in front of any S3 server, and tells which
operations were made, not just how many. `SeaweedMetricsCounter` reads SeaweedFS's own
Prometheus counter instead (used by the tests to check the proxy misses nothing).
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .seaweedfs import S3Bucket, free_ports

# Not forwarded: per-connection headers (aiohttp frames the body itself from Content-Length),
# and Expect, answered by the proxy's own server (SigV4 signers leave it out of the signature).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection"}


@dataclass(frozen=True)
class S3Call:
    operation: str  # e.g. GetObject, PutObject, ListObjectsV2
    method: str
    path: str  # /bucket/key, query left out
    status: int | None = None  # filled in when the answer came back


def s3_operation(method: str, path: str, query: dict[str, str], headers) -> str:
    """The S3 API operation of a path-style request."""
    parts = path.lstrip("/").split("/", 1)
    has_key = len(parts) == 2 and parts[1] != ""
    if path in ("", "/"):
        return "ListBuckets"
    if not has_key:
        if method == "GET":
            if "uploads" in query:
                return "ListMultipartUploads"
            return "ListObjectsV2" if query.get("list-type") == "2" else (
                "GetBucketLocation" if "location" in query else "ListObjects")
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        return {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(method, f"{method} bucket")
    copy = "x-amz-copy-source" in {k.lower() for k in headers}
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject"
    return f"{method} object"


class CountingProxy:
    """Forward 127.0.0.1:<free port> to `upstream` (an S3 endpoint URL), counting requests.
    Runs in a thread with its own event loop; use as a context manager, or start()/stop()."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_ports(1)[0]
        self.calls: list[S3Call] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3-counting-proxy", daemon=True)
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def via(self, bucket: S3Bucket) -> S3Bucket:
        """`bucket` as reached through this proxy."""
        return replace(bucket, endpoint=self.endpoint)

    # -- the counter interface (see tests/s3_roundtrips.py)

    def count(self) -> int:
        with self._lock:
            return len(self.calls)

    def calls_since(self, mark: int) -> list[S3Call]:
        with self._lock:
            return list(self.calls[mark:])

    def operations_since(self, mark: int) -> Counter:
        return Counter(call.operation for call in self.calls_since(mark))

    # -- forwarding

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw_query = request.rel_url.raw_query_string
        query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
        with self._lock:
            index = len(self.calls)
            call = S3Call(s3_operation(request.method, request.rel_url.path, query, request.headers),
                          request.method, request.rel_url.path)
            self.calls.append(call)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        url = f"{self.upstream}{request.rel_url.raw_path}" + (f"?{raw_query}" if raw_query else "")
        body = request.content if request.body_exists else None
        async with self._session.request(request.method, url, headers=headers, data=body,
                                         allow_redirects=False,
                                         skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent",
                                                            "Content-Type")) as upstream:
            with self._lock:
                self.calls[index] = S3Call(call.operation, call.method, call.path, upstream.status)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
            await response.write_eof()
            return response

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
            app = web.Application(client_max_size=1 << 40)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def start(self) -> "CountingProxy":
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise RuntimeError(f"counting proxy did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "CountingProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SeaweedMetricsCounter:
    """The sum of SeaweedFS's `SeaweedFS_s3_request_total` (every S3 request, any bucket, any code),
    read from the server's -metricsPort. Counts all clients of that server, proxy or not."""

    LINE = re.compile(r"^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$", re.M)

    def __init__(self, metrics_url: str):
        self.metrics_url = metrics_url

    def by_label(self) -> Counter:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        totals: Counter = Counter()
        for labels, value in self.LINE.findall(text):
            totals[labels] += int(float(value))
        return totals

    def count(self) -> int:
        return sum(self.by_label().values())
