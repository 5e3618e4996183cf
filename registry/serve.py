"""Run the application: one guarded TCP site (registry/connections.py) until SIGINT or SIGTERM
(in one process, or in each worker of registry/supervisor.py)."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
from typing import Callable

from aiohttp import web

from .access_log import AccessLogger
from .config import Config
from .connections import ConnectionLimits, GuardedSite, quiet_accept_errors
from .startup import StartupError, reason

log = logging.getLogger("kura.server")

# Descriptors kept for everything but connections (listening socket, logs, store files of
# requests in progress); each connection may need a second one for the file it streams.
RESERVED_DESCRIPTORS = 64
# A worker that stops waits at most this long for the requests of connections it accepted.
FIRST_BYTES_GRACE = 2.0
DESCRIPTORS_PER_CONNECTION = 2


def handler_settings(config: Config) -> dict:
    """aiohttp protocol settings: the same for `kura serve` and for the API tests."""
    return {
        "keepalive_timeout": config.idle_timeout_seconds,
        # Bodies are stored as sent, as the reference registry does: digests are over the
        # bytes on the wire, and inflating `Content-Encoding: gzip` is a decompression bomb.
        "auto_decompress": False,
        # A request body is buffered up to twice this before aiohttp stops reading the socket.
        "read_bufsize": 16 * 1024,
        # The request line, once the response is complete (used where an access_log is given).
        "access_log_class": AccessLogger,
    }


def raise_open_file_limit() -> int:
    """Raise the soft descriptor limit to the hard one (as Go does); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_limits(config: Config, open_files: int) -> ConnectionLimits:
    cap = config.max_connections
    if open_files != resource.RLIM_INFINITY:
        room = max(1, (open_files - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)
        if cap > room:
            log.warning("server.max_connections %d needs more descriptors than the open-file limit (%d) "
                        "allows; using %d (raise `ulimit -n` to allow more)", cap, open_files, room)
            cap = room
    return ConnectionLimits(max_connections=cap, max_per_client=config.max_connections_per_client,
                            header_timeout=config.header_timeout_seconds,
                            body_timeout=config.body_timeout_seconds,
                            max_header_bytes=config.max_header_bytes)


def run(app: web.Application, config: Config, ssl_context=None, notes: list[tuple[int, str]] = (), *,
        socks: list[socket.socket] | None = None, ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; `notes` are logged once the address is bound (so
    "serving on" is never printed by a server that then fails to listen).

    A worker of `kura serve --workers N` serves `socks` (its supervisor bound them and keeps
    them open) and calls `ready` once it accepts connections."""
    asyncio.run(_serve(app, config, ssl_context, notes, socks, ready))


async def _serve(app: web.Application, config: Config, ssl_context, notes, socks, ready) -> None:
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = dict(handler_settings(config),
                    access_log=logging.getLogger("aiohttp.access") if config.access_log else None)
    limits = connection_limits(config, raise_open_file_limit())
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout_seconds)
    await runner.setup()
    site = GuardedSite(runner, config.host, config.port, limits, settings, ssl_context=ssl_context, socks=socks)
    try:
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.listen}: {reason(exc)}") from None
        for level, message in notes:
            log.log(level, "%s", message)
        if ready is not None:
            ready()
        await stop.wait()
        if socks is not None:
            # The sockets stay open (other workers serve them): stop accepting, then give
            # whom this worker accepted a moment to send their request, which is answered.
            await site.stop()
            await site.connections.await_first_bytes(FIRST_BYTES_GRACE)
    finally:
        await runner.cleanup()  # answers the requests in progress (server.shutdown_timeout_seconds)
        if socks is not None and site.connections is not None:
            # What asyncio still buffers for slow readers is lost if the worker exits now.
            await site.connections.await_gone(config.shutdown_timeout_seconds)
