"""`GET /healthz` (the process answers) and `GET /readyz` (it can serve: the store takes a write
and reads it back, the token signing key is loaded, the pull-through cache's upstreams answer).

Both are open to anyone and cheap enough to be polled every second by each of several load
balancers: the store check is a small write/read/delete in the store's temp area through the
driver (any driver), run at most once per STORE_CHECK_CACHE_SECONDS per process however many
polls arrive (concurrent polls share one run); an upstream is asked `GET /v2/` at most once
per UPSTREAM_CHECK_CACHE_SECONDS, in the background once it has an answer.

Only a store that cannot be used, or a missing signing key, makes the answer 503. A full store
(pulls still work; pushes get 507) and an upstream that does not answer (the cache serves what
it holds) are "degraded", with 200: taking every instance out of a balancer for them would turn
a partial outage into a whole one. /v2/ never depends on these checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from storage import StorageError, StorageFull

from ..auth.controller import AUTH
from ..context import CONFIG, STORAGE
from ..proxy.front import PROXY

STORE_CHECK_CACHE_SECONDS = 1.0
STORE_CHECK_TIMEOUT = 5.0
UPSTREAM_CHECK_CACHE_SECONDS = 30.0
UPSTREAM_CHECK_TIMEOUT = 3.0

OK, DEGRADED, FAILED = "ok", "degraded", "failed"


@dataclass(frozen=True)
class Check:
    status: str
    duration: float
    checked_at: float  # time.time() of the run this result comes from (shared by cached answers)
    error: str | None = None

    def to_json(self) -> dict:
        body = {"status": self.status, "duration_seconds": round(self.duration, 6),
                "checked_at": round(self.checked_at, 6)}
        if self.error is not None:
            body["error"] = self.error
        return body


class CachedCheck:
    """One check's last result, run again when older than `max_age`; concurrent callers share
    one run. `wait`: how long a caller waits for a run when there is a result already
    (None: until it ends; 0: answer with the previous result, the run goes on)."""

    def __init__(self, run, max_age: float, wait: float | None):
        self._run = run
        self.max_age = max_age
        self.wait = wait
        self.last: Check | None = None
        self._running: asyncio.Task | None = None

    async def result(self) -> Check:
        if self.last is not None and time.time() - self.last.checked_at < self.max_age:
            return self.last
        if self._running is None:
            self._running = asyncio.ensure_future(self._timed())
            self._running.add_done_callback(self._ended)
        if self.last is None or self.wait is None:
            return await asyncio.shield(self._running)
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._running), self.wait)
        return self.last

    def _ended(self, task: asyncio.Task) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self.last = task.result()

    async def _timed(self) -> Check:
        at, started = time.time(), time.perf_counter()
        status, error = await self._run()
        return Check(status, time.perf_counter() - started, at, error)

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running


def store_check(app: web.Application) -> CachedCheck:
    driver = app[STORAGE]

    async def run() -> tuple[str, str | None]:
        try:
            await asyncio.wait_for(driver.probe(), STORE_CHECK_TIMEOUT)
        except asyncio.TimeoutError:
            return FAILED, f"the store did not answer within {STORE_CHECK_TIMEOUT:g} s"
        except StorageFull as exc:
            return DEGRADED, f"the store is full (pushes are answered 507 until space is freed): {exc}"
        except (StorageError, OSError) as exc:
            return FAILED, str(exc) or type(exc).__name__
        return OK, None

    return CachedCheck(run, STORE_CHECK_CACHE_SECONDS, wait=None)


def upstream_check(upstream) -> CachedCheck:
    """`GET /v2/` of a proxy's upstream (free of Docker Hub's pull limit): any answer below 500
    but 429 (401 is the usual one) means it can be reached."""
    url = f"{upstream.proxy.remote}/v2/"

    async def run() -> tuple[str, str | None]:
        if upstream.down:
            return DEGRADED, f"{upstream.proxy.remote} could not be reached moments ago: {upstream.last_failure}"
        try:
            async with upstream.session.get(url, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=UPSTREAM_CHECK_TIMEOUT)) as response:
                status = response.status
        except asyncio.TimeoutError:
            return DEGRADED, f"{url} did not answer within {UPSTREAM_CHECK_TIMEOUT:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return DEGRADED, f"{url}: {exc or type(exc).__name__}"
        if status >= 500 or status == 429:
            return DEGRADED, f"{url} answered {status}"
        return OK, None

    return CachedCheck(run, UPSTREAM_CHECK_CACHE_SECONDS, wait=0)


def _instant(status: str, error: str | None = None) -> Check:
    return Check(status, 0.0, time.time(), error)


def token_key_check(app: web.Application) -> Check | None:
    """Token mode: the key tokens are signed with (or the keys of the trusted issuer) loaded."""
    config = app[CONFIG].auth
    if config.mode != "token":
        return None
    state = app[AUTH]
    if config.external is not None:
        keys = getattr(state.controller, "public_keys", None)
        return _instant(OK) if keys else _instant(FAILED, "no key of the trusted issuer is loaded")
    if state.signing_key is None:
        return _instant(FAILED, "the token signing key is not loaded")
    return _instant(OK)


class Readiness:
    def __init__(self, app: web.Application):
        self.app = app
        self.store = store_check(app)
        self.upstreams: dict[str, CachedCheck] = {}

    async def checks(self) -> dict[str, Check]:
        checks = {"storage": await self.store.result()}
        token = token_key_check(self.app)
        if token is not None:
            checks["token_signing_key"] = token
        service = self.app.get(PROXY)
        if service is not None:
            for prefix, upstream in service.upstreams.items():
                if prefix not in self.upstreams:
                    self.upstreams[prefix] = upstream_check(upstream)
            names = [f"upstream:{upstream.proxy.name}" for upstream in service.upstreams.values()]
            results = await asyncio.gather(*(self.upstreams[prefix].result() for prefix in service.upstreams))
            checks.update(zip(names, results))
        return checks

    async def close(self) -> None:
        for check in (self.store, *self.upstreams.values()):
            await check.close()


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[READINESS].checks()
    statuses = {check.status for check in checks.values()}
    overall = "not ready" if FAILED in statuses else "degraded" if DEGRADED in statuses else "ready"
    return web.json_response({"status": overall, "checks": {name: c.to_json() for name, c in checks.items()}},
                             status=503 if overall == "not ready" else 200, headers={"Cache-Control": "no-store"})


async def _close_checks(app: web.Application):
    yield
    await app[READINESS].close()


def setup(app: web.Application) -> None:
    app[READINESS] = Readiness(app)
    app.cleanup_ctx.append(_close_checks)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
