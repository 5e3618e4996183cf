"""A notification endpoint on loopback that records every envelope it is sent."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .servers import free_port


class EventReceiver:
    """POSTs to any path are recorded (headers and parsed body) and answered 200, or with the
    statuses of `failures` first, one per request."""

    def __init__(self, failures: tuple[int, ...] = (), port: int | None = None):
        self.port = port or free_port()
        self.failures = list(failures)
        self.posts: list[tuple[dict, dict]] = []
        self.header_values: list[dict[str, list[str]]] = []
        """Per post: header name -> every value sent under it."""
        self.refused = 0
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    @property
    def events(self) -> list[dict]:
        return [event for _headers, body in self.posts for event in body["events"]]

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.failures:
            self.refused += 1
            return web.Response(status=self.failures.pop(0))
        self.posts.append((dict(request.headers), json.loads(body)))
        values: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            values.setdefault(name, []).append(value)
        self.header_values.append(values)
        self._arrived.set()
        return web.Response(status=200)

    async def start(self) -> "EventReceiver":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, timeout: float = 60.0, counted=lambda event: True) -> list[dict]:
        """The events once at least `count` of those `counted` arrived (the timeout is only a
        safety net: it fails the test, saying what did arrive)."""
        try:
            async with asyncio.timeout(timeout):
                while sum(1 for event in self.events if counted(event)) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            seen = [(e["action"], e["request"]["method"], e["target"].get("repository")) for e in self.events]
            raise AssertionError(f"{count} events expected, {len(seen)} arrived: {seen}") from None
        return self.events

    async def settle(self, seconds: float = 0.5) -> list[dict]:
        """The events after nothing more arrived for `seconds` (to see that none are extra)."""
        while True:
            seen = len(self.events)
            await asyncio.sleep(seconds)
            if len(self.events) == seen:
                return self.events
