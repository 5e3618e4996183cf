"""`make_app(config)`: the one entry that `kura serve` and the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from aiohttp import web

from storage import FilesystemDriver, StorageDriver

from . import quota
from .access_log import add_request_id, request_context
from .auth.controller import AUTH, auth_middleware
from .auth.controller import build as build_auth
from .config import Config
from .context import CONFIG, STORAGE
from .monitoring import health
from .monitoring.recorder import RECORDER, Recorder
from .middlewares import add_api_version, error_middleware, head_size_limit, unauthenticated_body_limit
from .proxy.front import PROXY, proxy_middleware
from .proxy.front import status as proxy_status
from .routes import setup_routes

log = logging.getLogger("kura.registry")


def make_app(config: Config, driver: StorageDriver | None = None) -> web.Application:
    # /v2 handlers stream their bodies; client_max_size bounds only aiohttp's own read(), used
    # by the token endpoint, which reads its form before it knows who is asking.
    app = web.Application(middlewares=[request_context, error_middleware, head_size_limit,
                                       unauthenticated_body_limit, auth_middleware, proxy_middleware],
                          client_max_size=config.max_unauthenticated_body_bytes)
    app[CONFIG] = config
    app[STORAGE] = driver or FilesystemDriver(config.root)
    app[AUTH] = auth = build_auth(config.auth, Path(config.root))
    app[RECORDER] = Recorder()
    if config.metrics_enabled:
        from .monitoring import metrics  # prometheus_client: only when metrics are on

        # Inside any logging middleware, outside error_middleware: it counts final statuses.
        app.middlewares.insert(app.middlewares.index(error_middleware), metrics.setup(app, config))
    if auth.credentials is not None:
        auth.credentials.on_failure = app[RECORDER].failed_login
    app.on_response_prepare.append(add_api_version)
    app.on_response_prepare.append(add_request_id)
    app.on_startup.append(quota.recount_at_start)
    app.cleanup_ctx.append(_upload_purger)
    app.cleanup_ctx.append(_garbage_collector)
    if config.notifications:
        from .notify.delivery import NOTIFIER, Notifier, run_deliverers, source_record

        app[NOTIFIER] = Notifier(config.notifications, app[STORAGE], source_record(config.port))
        app.cleanup_ctx.append(run_deliverers)
    if config.proxies:
        from .proxy.service import ProxyService  # the upstream client (puller/): only for a proxy

        app[PROXY] = ProxyService(config.proxies, app[STORAGE], _spool_dir(config),
                                  collect=lambda: collect_garbage(app), recorder=app[RECORDER])
        app.cleanup_ctx.append(_proxy)
        app.router.add_get("/proxy/status", proxy_status)
    health.setup(app)
    setup_routes(app)
    if config.ui_enabled:
        from . import ui  # its routes; its pages (and jinja2) load on the first request for one

        ui.setup(app)
    if auth.signing_key is not None:
        from .auth import issuer  # cryptography: only for the token issuer

        issuer.setup_routes(app)
    return app


async def _upload_purger(app: web.Application):
    """Expire abandoned upload sessions at start-up and then periodically."""
    config = app[CONFIG]
    driver = app[STORAGE]

    async def loop() -> None:
        while True:
            try:
                purged = await driver.purge_uploads(time.time() - config.upload_expiry_seconds)
                if purged:
                    log.info("purged %d expired upload session(s)", purged)
            except Exception:
                log.exception("purging expired uploads failed")
            await asyncio.sleep(config.upload_purge_interval_seconds)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await driver.close()


# After a collection that could not run or failed, try again after at most this long.
GC_RETRY_SECONDS = 60


async def _garbage_collector(app: web.Application):
    """A collection every gc.interval_seconds, counted from the last one on the store (by
    any process) or from start-up: several processes serving one store share the schedule."""
    config = app[CONFIG]
    driver = app[STORAGE]
    interval = config.gc_interval_seconds
    started = time.time()

    async def loop() -> None:
        while True:
            try:
                last = await driver.last_collection()
            except Exception:  # the store is unreachable for now: ask again later
                log.exception("reading when the last garbage collection ran failed")
                await asyncio.sleep(min(interval, GC_RETRY_SECONDS))
                continue
            wait = (last or started) + interval - time.time()
            if wait > 0:
                await asyncio.sleep(min(wait, interval))
                continue
            try:
                report = await collect_garbage(app)
            except Exception:
                log.exception("garbage collection failed")
                await asyncio.sleep(min(interval, GC_RETRY_SECONDS))
                continue
            if report.skipped:  # another process is collecting: its end restarts the count
                await asyncio.sleep(min(interval, GC_RETRY_SECONDS))
                continue
            log.info("garbage collection freed %d bytes: %d blob(s), %d blob link(s), %d manifest(s), %d tag(s), "
                     "%d empty repositories, %s expired upload(s), in %.1f s", report.bytes_freed,
                     len(report.blobs), len(report.layer_links), len(report.manifests), len(report.tags),
                     len(report.repositories), report.uploads, report.duration)

    task = asyncio.create_task(loop()) if interval else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def collect_garbage(app: web.Application):
    """One collection of the app's store (quota.collect_garbage), reported to its recorder."""
    recorder = app[RECORDER]
    started = time.monotonic()
    try:
        report = await quota.collect_garbage(app[STORAGE], app[CONFIG])
    except Exception:
        recorder.garbage_collection("failed", time.monotonic() - started, 0, 0)
        raise
    recorder.garbage_collection("skipped" if report.skipped else "completed", report.duration,
                                report.bytes_freed, len(report.blobs))
    return report


def _spool_dir(config: Config) -> Path | None:
    """Blobs on their way from an upstream are spooled beside the store's own temp files (the
    collection removes what a crash left there); elsewhere in the system's temp directory."""
    tmp = Path(config.root) / "tmp"
    return tmp if tmp.is_dir() else None


async def _proxy(app: web.Application):
    service = app[PROXY]
    await service.start()
    yield
    await service.close()
