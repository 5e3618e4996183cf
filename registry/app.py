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
from .auth import issuer
from .auth.controller import AUTH, auth_middleware
from .auth.controller import build as build_auth
from .config import Config
from .context import CONFIG, STORAGE
from .middlewares import add_api_version, error_middleware, head_size_limit, unauthenticated_body_limit
from .routes import setup_routes

log = logging.getLogger("kura.registry")


def make_app(config: Config, driver: StorageDriver | None = None) -> web.Application:
    # /v2 handlers stream their bodies; client_max_size bounds only aiohttp's own read(), used
    # by the token endpoint, which reads its form before it knows who is asking.
    app = web.Application(middlewares=[error_middleware, head_size_limit, unauthenticated_body_limit,
                                       auth_middleware],
                          client_max_size=config.max_unauthenticated_body_bytes)
    app[CONFIG] = config
    app[STORAGE] = driver or FilesystemDriver(config.root)
    app[AUTH] = auth = build_auth(config.auth, Path(config.root))
    app.on_response_prepare.append(add_api_version)
    app.on_startup.append(quota.recount_at_start)
    app.cleanup_ctx.append(_upload_purger)
    setup_routes(app)
    if auth.signing_key is not None:
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
