"""Delivering events from the store's outboxes to the endpoints.

An event is written into the outbox of every endpoint that wants it (storage: temp file,
fsync, rename) before the response of the request that caused it is sent. Each process serving
the store runs a deliverer per endpoint, but only the one holding the outbox's lease sends:
it posts the oldest events in one envelope, removes them once the endpoint answered 2xx, and
otherwise tries the same batch again after a backoff (doubling up to a bound), so events
reach an endpoint in the order they were written. An event older than the endpoint's
max_age_seconds is moved to the outbox's failed folder with a log line. A process that stops
leaves its queue to the next holder: nothing is lost, and an event whose delivery was cut off
before its removal is sent again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid

import aiohttp
from aiohttp import web

from storage import StorageDriver
from storage.driver import OutboxLease, OutboxRecord

from .config import Endpoint

ENVELOPE_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BATCH_EVENTS = 32
# The lease holder looks for events other processes wrote this often (its own wake it at once).
POLL_SECONDS = 1.0
# A process that does not hold an outbox's lease tries to take it this often.
LEASE_RETRY_SECONDS = 5.0
# Store errors (not the endpoint's) are retried after this long.
STORE_RETRY_SECONDS = 5.0

log = logging.getLogger("kura.notify")


class Notifier:
    """The endpoints of one process, and the wake-ups of their deliverers."""

    def __init__(self, endpoints: tuple[Endpoint, ...], driver: StorageDriver, source: dict):
        self.endpoints = endpoints
        self.driver = driver
        self.source = source
        self.wakeups = {endpoint.name: asyncio.Event() for endpoint in endpoints}
        self.deliverers: list[Deliverer] = []
        """Each endpoint's, with its counters (delivered, failed_attempts, expired)."""

    def endpoints_for(self, action: str, repository: str) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.wants(action, repository)]

    async def enqueue(self, endpoints: list[Endpoint], data: bytes) -> None:
        """Write the event into each endpoint's outbox. The change it reports has committed, so
        a store that fails here costs the event, never the request: logged, with the event."""
        results = await asyncio.gather(*(self.driver.append_outbox(e.name, data) for e in endpoints),
                                       return_exceptions=True)
        for endpoint, result in zip(endpoints, results):
            if isinstance(result, BaseException):
                log.error("notifications to %s: could not queue an event (%s), lost: %s",
                          endpoint.name, result, data.decode(errors="replace"))
            else:
                self.wakeups[endpoint.name].set()


NOTIFIER = web.AppKey("notifier", Notifier)


def source_record(port: int) -> dict:
    """Who sends: this host and port, and an id of this process (as the reference's instanceID)."""
    return {"addr": f"{socket.gethostname()}:{port}", "instanceID": str(uuid.uuid4())}


class Deliverer:
    """Works through one endpoint's outbox while this process holds its lease."""

    def __init__(self, endpoint: Endpoint, driver: StorageDriver, session: aiohttp.ClientSession,
                 wakeup: asyncio.Event):
        self.endpoint = endpoint
        self.driver = driver
        self.session = session
        self.wakeup = wakeup
        self.delivered = 0
        self.failed_attempts = 0
        self.expired = 0

    async def run(self) -> None:
        name = self.endpoint.name
        while True:
            try:
                async with self.driver.outbox_lease(name) as lease:
                    if lease is not None:
                        await self._work(lease)
                        continue
                await asyncio.sleep(LEASE_RETRY_SECONDS)
            except Exception as exc:
                log.warning("notifications to %s: the store failed (%s); trying again in %.0f s",
                            name, exc, STORE_RETRY_SECONDS)
                await asyncio.sleep(STORE_RETRY_SECONDS)

    async def _work(self, lease: OutboxLease) -> None:
        name = self.endpoint.name
        delay = 0.0
        while not lease.lost:
            self.wakeup.clear()
            records = await self._unexpired(await self.driver.pending_outbox(name, BATCH_EVENTS))
            if not records:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self.wakeup.wait()
                continue
            failure = await self._post(records)
            if failure is None:
                await self.driver.remove_outbox(name, [record.key for record in records])
                self.delivered += len(records)
                delay = 0.0
                continue
            self.failed_attempts += 1
            delay = min(delay * 2, self.endpoint.max_backoff_seconds) if delay else self.endpoint.backoff_seconds
            log.warning("notifications to %s: %s; %d event(s) kept, next try in %g s",
                        name, failure, len(records), delay)
            await asyncio.sleep(delay)

    async def _unexpired(self, records: list[OutboxRecord]) -> list[OutboxRecord]:
        """The records to send; those past the endpoint's maximum age go to failed/."""
        oldest_kept = time.time_ns() - int(self.endpoint.max_age_seconds * 1e9)
        kept = []
        for record in records:
            if int(record.key.partition("-")[0]) >= oldest_kept:
                kept.append(record)
                continue
            log.error("notifications to %s: gave up on event %s after %g s undelivered; kept in the "
                      "outbox's failed folder", self.endpoint.name, record.key, self.endpoint.max_age_seconds)
            await self.driver.fail_outbox(self.endpoint.name, record.key)
            self.expired += 1
        return kept

    async def _post(self, records: list[OutboxRecord]) -> str | None:
        """Send one envelope; None when the endpoint took it, else what went wrong."""
        body = b'{"events": [' + b", ".join(record.data for record in records) + b"]}"
        headers = [("Content-Type", ENVELOPE_MEDIA_TYPE), *self.endpoint.headers]
        try:
            async with self.session.post(self.endpoint.url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds)) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return None
                return f"the endpoint answered HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"delivery failed: {type(exc).__name__} {exc}".rstrip()


async def run_deliverers(app: web.Application):
    """cleanup_ctx: a deliverer per endpoint, for as long as the application runs."""
    notifier = app[NOTIFIER]
    session = aiohttp.ClientSession(headers={"User-Agent": "Kura-Notifications"})
    deliverers = [Deliverer(e, notifier.driver, session, notifier.wakeups[e.name]) for e in notifier.endpoints]
    tasks = [asyncio.create_task(d.run(), name=f"notify-{d.endpoint.name}") for d in deliverers]
    notifier.deliverers = deliverers
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await session.close()
