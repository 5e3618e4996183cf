"""A minimal TLS-terminating reverse proxy for tests, run in a thread of its own.

`/v2/...` goes to the backend as is; `PREFIX/...` goes to the backend without the prefix.
It tells the backend where it is with X-Forwarded-Proto/Host/Prefix, as nginx would."""

from __future__ import annotations

import asyncio
import ssl
import threading

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class ReverseProxy:
    def __init__(self, backend: str, prefix: str, port: int, cert, key):
        self.backend, self.prefix, self.port = backend.rstrip("/"), prefix.rstrip("/"), port
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-Host": request.host,
                        "X-Forwarded-Prefix": self.prefix})
        query = f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
        async with self._session.request(request.method, f"{self.backend}{path}{query}", headers=headers,
                                         data=request.content if request.can_read_body else None,
                                         allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl).start()

        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> "ReverseProxy":
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
