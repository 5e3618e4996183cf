"""Admission and time limits for the server's connections: what aiohttp leaves open.

aiohttp closes idle keep-alive connections (`keepalive_timeout`), but it lets a client take
forever to send a request's head or body and hold as many connections as the process has
descriptors. Here every accepted connection is checked against the caps before aiohttp
sees a byte of it, and one timer sweeps all live connections for stalled heads and bodies.

The hooks read a few internals of aiohttp's RequestHandler (`_request_count`, `_messages`,
`_reading_paused`, `_buffer_paused`); tests/test_e2e_limits.py pins the behaviour they give.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass

from aiohttp import web
from aiohttp.streams import StreamReader

log = logging.getLogger("kura.server")

REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
           b"Content-Length: 0\r\n\r\n")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                  b"Content-Length: 0\r\n\r\n")
# The answer to a TLS handshake on a plain-HTTP port. Go clients recognise an HTTP answer to
# their ClientHello ("server gave HTTP response to HTTPS client"), so one is still sent.
_PLAIN_ONLY = b"This port speaks plain HTTP, not HTTPS.\n"
PLAIN_HTTP_ONLY = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_ONLY), _PLAIN_ONLY))
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a TLS ClientHello; no HTTP method starts with it
REPORT_INTERVAL = 10.0
ADMISSION_WAIT = 0.2
RECV_SIZE = 64 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_per_client: int  # 0: no per-client cap
    header_timeout: float
    body_timeout: float
    max_header_bytes: int

    @property
    def sweep_interval(self) -> float:
        return min(1.0, max(0.05, min(self.header_timeout, self.body_timeout) / 4))


class RateLimitedLog:
    """One log line for the first event, then at most one summary line per interval."""

    def __init__(self, loop: asyncio.AbstractEventLoop, level: int, what: str, interval: float = REPORT_INTERVAL):
        self.loop = loop
        self.level = level
        self.what = what
        self.interval = interval
        self.pending = 0
        self.detail = ""
        self._window = None

    def note(self, detail: str) -> None:
        self.detail = detail
        if self._window is None:
            log.log(self.level, "%s: %s", self.what, detail)
            self._window = self.loop.call_later(self.interval, self._report)
        else:
            self.pending += 1

    def _report(self) -> None:
        self._window = None
        if self.pending:
            log.log(self.level, "%s: %s (%d more time(s) in the last %.0f s)",
                    self.what, self.detail, self.pending, self.interval)
            self.pending = 0
            self._window = self.loop.call_later(self.interval, self._report)

    def close(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._report()


class Connections:
    """The live connections of one listening site, the caps on them, and the sweep timer."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop):
        self.limits = limits
        self.loop = loop
        self._live: dict[GuardedRequestHandler, str] = {}
        self._by_client: dict[str, dict[GuardedRequestHandler, None]] = {}
        self.pressure = RateLimitedLog(loop, logging.WARNING, "connection limits reached")
        self._sweep_handle = loop.call_later(limits.sweep_interval, self._sweep)

    def admit(self, connection: GuardedRequestHandler, client: str) -> bool:
        """Make room for `connection` from `client` by closing an idle connection if a cap
        is reached; False when there is none to close (the newcomer is refused)."""
        mine = self._by_client.get(client, {})
        if self.limits.max_per_client and len(mine) >= self.limits.max_per_client:
            if not self._evict_idle(mine, f"{client} holds server.max_connections_per_client connections"):
                return False
        if len(self._live) >= self.limits.max_connections:
            if not self._evict_idle(self._live, "server.max_connections reached"):
                return False
        self._live[connection] = client
        self._by_client.setdefault(client, {})[connection] = None
        return True

    def _evict_idle(self, candidates, reason: str) -> bool:
        idle = [c for c in candidates if c.idle]
        if not idle:
            self.pressure.note(f"{reason}, none of them idle: refused a new connection")
            return False
        victim = min(idle, key=lambda c: c.last_activity)
        self.pressure.note(f"{reason}: closed the longest idle one")
        victim.close_now(reason)
        return True

    def release(self, connection: GuardedRequestHandler) -> None:
        client = self._live.pop(connection, None)
        if client is None:
            return
        mine = self._by_client[client]
        del mine[connection]
        if not mine:
            del self._by_client[client]

    async def await_first_bytes(self, grace: float) -> None:
        """Until no connection is still waiting for its first request (or `grace` seconds
        passed): a worker that stops accepting answers what it accepted, rather than close
        connections whose clients have not had the time to send anything yet."""
        deadline = self.loop.time() + grace
        # A connection accepted just before is admitted a few loop turns later (after its
        # TLS handshake, with TLS): let those arrive first.
        await asyncio.sleep(min(grace, ADMISSION_WAIT))
        while any(c.before_first_request for c in self._live) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def await_gone(self, timeout: float) -> None:
        """Until every connection is closed (a closing transport first sends what it buffers)."""
        deadline = self.loop.time() + timeout
        while self._live and self.loop.time() < deadline:
            await asyncio.sleep(0.02)

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self._live):
            connection.check_deadlines(now)
        self._sweep_handle = self.loop.call_later(self.limits.sweep_interval, self._sweep)

    def close(self) -> None:
        self._sweep_handle.cancel()
        self.pressure.close()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol, plus: admission against the caps, a bound on the size and time of
    a request's head, and a bound on how long a body may make no progress."""

    def __init__(self, manager: web.Server, connections: Connections, **kwargs):
        super().__init__(manager, loop=connections.loop, **kwargs)
        self.connections = connections
        self.limits = connections.limits
        self.admitted = False
        self.stalled = False  # closed by a time-out: handlers cut off answer 408 in the access log
        self.closed_because: str | None = None  # why we closed it, when we did
        self.last_activity = connections.loop.time()
        self._head_started: float | None = None  # first byte of a request whose head is incomplete
        self._head_bytes = 0
        self._body: StreamReader | None = None  # body of the newest request
        self._body_progress = 0.0
        self._unanswered = 0  # requests whose head arrived and whose response is not yet sent

    # -- admission ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self.connections.admit(self, client):
            transport.write(REFUSED)
            transport.close()
            return
        self.admitted = True
        if hasattr(transport, "max_size"):
            transport.max_size = RECV_SIZE
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.admitted:
            return
        self.connections.release(self)
        super().connection_lost(exc)

    @property
    def before_first_request(self) -> bool:
        """Accepted, and no request head complete yet: a client that has just connected."""
        return self._request_count == 0

    @property
    def idle(self) -> bool:
        """Between requests (or before the first): closing it loses no work."""
        return (self._unanswered == 0 and self._head_started is None
                and (self._body is None or self._body.is_eof()))

    # -- progress -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._request_count == 0 and self._head_started is None and data[:1] == bytes([TLS_HANDSHAKE_RECORD]):
            self._refuse_tls_handshake()
            return
        now = self.loop_time()
        self.last_activity = now
        in_body = self._body is not None and not self._body.is_eof()
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._unanswered += self._request_count - heads
            self._head_started, self._head_bytes = None, 0
            self._body = self._messages[-1][1] if self._messages else None
            self._body_progress = now
        elif in_body:
            # Body bytes (what follows a body's end in the same read, if anything, is only
            # counted as a head once more of it arrives).
            self._body_progress = now
        elif data and self.transport is not None:
            if self._head_started is None:
                self._head_started = now
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self.transport.write(HEAD_TOO_LARGE)
                self.close_now(f"request head larger than limits.max_header_bytes ({self.limits.max_header_bytes})")

    async def finish_response(self, request, resp, start_time):
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._unanswered -= 1
            self.last_activity = self.loop_time()

    def _refuse_tls_handshake(self) -> None:
        """Port scanners and clients with the wrong scheme: worth a DEBUG line, not the
        access log (where they were a fifth of the entries)."""
        peer = self.peername
        log.debug("TLS handshake from %s on the plain-HTTP port: answered 400 and closed",
                  "%s:%s" % peer[:2] if isinstance(peer, tuple) else peer)
        if self.transport is not None:
            self.transport.write(PLAIN_HTTP_ONLY)
        self.connections.release(self)
        self.force_close()

    def check_deadlines(self, now: float) -> None:
        if self._head_started is not None and now - self._head_started > self.limits.header_timeout:
            self.close_now(f"request head not complete within server.header_timeout_seconds "
                           f"({self.limits.header_timeout:g} s)", stalled=True)
            return
        body = self._body
        if body is None or body.is_eof():
            return
        if self._reading_paused or self._buffer_paused:
            self._body_progress = now  # we are not reading: the client is not to blame
        elif now - self._body_progress > self.limits.body_timeout:
            self.close_now(f"request body made no progress for server.body_timeout_seconds "
                           f"({self.limits.body_timeout:g} s)", stalled=True)

    def close_now(self, reason: str, *, stalled: bool = False) -> None:
        """Close at once (a handler reading the body gets a ConnectionResetError); a stalled
        connection is reset, dropping anything it has not read of what we sent."""
        log.debug("closing connection from %s: %s", self.peername, reason)
        self.stalled = stalled
        self.closed_because = reason
        self.connections.release(self)
        transport = self.transport
        self.force_close()
        if stalled and transport is not None:
            transport.abort()

    def loop_time(self) -> float:
        return self.connections.loop.time()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are GuardedRequestHandlers sharing one Connections. It
    binds host:port itself, or serves `socks`: listening sockets bound by someone else (a
    worker of `kura serve --workers N`, registry/supervisor.py)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limits: ConnectionLimits,
                 handler_settings: dict, *, ssl_context=None, backlog: int = 128,
                 socks: list[socket.socket] | None = None):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self.limits = limits
        self.handler_settings = handler_settings
        self.socks = socks
        self.connections: Connections | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        self.connections = connections = Connections(self.limits, loop)

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(manager, connections, **self.handler_settings)

        options = dict(ssl=self._ssl_context, backlog=self._backlog,
                       ssl_handshake_timeout=self.limits.header_timeout if self._ssl_context else None)
        if self.socks is None:
            self._server = await loop.create_server(protocol, self._host, self._port, **options)
        else:
            self._server = _Servers([await loop.create_server(protocol, sock=sock, **options)
                                     for sock in self.socks])

    async def stop(self) -> None:
        if self.connections is not None:
            self.connections.close()
        await super().stop()


class _Servers:
    """asyncio servers on several sockets, closed together (asyncio takes one `sock` each)."""

    def __init__(self, servers: list[asyncio.AbstractServer]):
        self.servers = servers

    def close(self) -> None:
        for server in self.servers:
            server.close()


ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed accept() (out of descriptors: up to one per
    queued connection, every second). Log one line per interval with a count instead."""
    errors = RateLimitedLog(loop, logging.ERROR, "cannot accept connections")

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        message = context.get("message", "")
        if "socket.accept()" in message and isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
            errors.note(f"{exc.strerror} (see server.max_connections and the open-file limit, ulimit -n)")
            return
        if "_start_serving" in message and isinstance(exc, (ValueError, OSError)):
            # asyncio's retry after such an error, firing after the listening socket closed.
            log.debug("accept retry after shutdown: %s", exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
