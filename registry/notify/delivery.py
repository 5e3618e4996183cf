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

from storage import StorageDriver, StorageError
from storage.driver import OutboxLease, OutboxRecord

from .config import Endpoint

ENVELOPE_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BATCH_EVENTS = 32
# A batch that is not full waits this long for more events before it is sent.
LINGER_SECONDS = 0.05
# The lease holder looks for events other processes wrote this often (its own wake it at once).
POLL_SECONDS = 1.0
# A process that does not hold an outbox's lease tries to take it this often.
LEASE_RETRY_SECONDS = 5.0
# Store errors (not the endpoint's) are retried after this long.
STORE_RETRY_SECONDS = 5.0

log = logging.getLogger("kura.notify")


class Notifier:
    """The endpoints of one process, what it is writing into their outboxes, and the wake-ups
    of their deliverers.

    Events for one endpoint are written by one task at a time: those that arrive while it
    writes go together into its next record (one line each), so requests at the same moment
    share the cost of a durable write, and the records of a process keep the order of its events."""

    def __init__(self, endpoints: tuple[Endpoint, ...], driver: StorageDriver, source: dict):
        self.endpoints = endpoints
        self.driver = driver
        self.source = source
        self.wakeups = {endpoint.name: asyncio.Event() for endpoint in endpoints}
        self._waiting: dict[str, list[tuple[bytes, asyncio.Future]]] = {e.name: [] for e in endpoints}
        self._writers: dict[str, asyncio.Task] = {}
        self.deliverers: list[Deliverer] = []
        """Each endpoint's, with its counters (delivered, failed_attempts, expired)."""
        self.queued = {endpoint.name: 0 for endpoint in endpoints}
        self.lost = {endpoint.name: 0 for endpoint in endpoints}
        """Events written into each outbox by this process, and those a failed write cost."""

    def endpoints_for(self, action: str, repository: str) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.wants(action, repository)]

    async def enqueue(self, endpoints: list[Endpoint], event: bytes) -> None:
        """Return once the event (one line of JSON) is in the outbox of each endpoint. The change
        it reports has committed, so a store that fails here costs the event, never the
        request: logged, with the event."""
        written = []
        for endpoint in endpoints:
            future = asyncio.get_running_loop().create_future()
            self._waiting[endpoint.name].append((event, future))
            if endpoint.name not in self._writers:
                self._writers[endpoint.name] = asyncio.create_task(self._write(endpoint.name))
            written.append(future)
        await asyncio.shield(asyncio.gather(*written))

    async def _write(self, name: str) -> None:
        try:
            while self._waiting[name]:
                batch, self._waiting[name] = self._waiting[name], []
                try:
                    await self.driver.append_outbox(name, b"\n".join(event for event, _ in batch))
                except Exception as exc:
                    self.lost[name] += len(batch)
                    for event, _ in batch:
                        log.error("notifications to %s: could not queue an event (%s), lost: %s",
                                  name, exc, event.decode(errors="replace"))
                else:
                    self.queued[name] += len(batch)
                    self.wakeups[name].set()
                for _, future in batch:
                    future.set_result(None)
        finally:
            del self._writers[name]


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
                            name, exc, STORE_RETRY_SECONDS, exc_info=not isinstance(exc, StorageError))
                await asyncio.sleep(STORE_RETRY_SECONDS)

    async def _work(self, lease: OutboxLease) -> None:
        name = self.endpoint.name
        delay = 0.0
        lingered = False
        while not lease.lost:
            self.wakeup.clear()
            pending = await self.driver.pending_outbox(name, BATCH_EVENTS)
            records = _batch(await self._unexpired(pending))
            if not records:
                if pending:  # all given up on: on to the next ones
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self.wakeup.wait()
                continue
            events = [line for record in records for line in record.data.split(b"\n")]
            if len(events) < BATCH_EVENTS and not lingered:
                # A moment for more to join them: under a stream of requests, one POST for
                # many events rather than one each.
                lingered = True
                await asyncio.sleep(LINGER_SECONDS)
                continue
            lingered = False
            failure = await self._post(events)
            if failure is None:
                await self.driver.remove_outbox(name, [record.key for record in records])
                self.delivered += len(events)
                delay = 0.0
                continue
            self.failed_attempts += 1
            delay = min(delay * 2, self.endpoint.max_backoff_seconds) if delay else self.endpoint.backoff_seconds
            log.warning("notifications to %s: %s; %d event(s) kept, next try in %g s",
                        name, failure, len(events), delay)
            await asyncio.sleep(delay)

    async def _unexpired(self, records: list[OutboxRecord]) -> list[OutboxRecord]:
        """The records to send; those past the endpoint's maximum age go to failed/."""
        oldest_kept = time.time_ns() - int(self.endpoint.max_age_seconds * 1e9)
        kept = []
        for record in records:
            if int(record.key.partition("-")[0]) >= oldest_kept:
                kept.append(record)
                continue
            log.error("notifications to %s: gave up on the event(s) of %s after %g s undelivered; kept in the "
                      "outbox's failed folder", self.endpoint.name, record.key, self.endpoint.max_age_seconds)
            await self.driver.fail_outbox(self.endpoint.name, record.key)
            self.expired += 1
        return kept

    async def _post(self, events: list[bytes]) -> str | None:
        """Send one envelope; None when the endpoint took it, else what went wrong."""
        body = b'{"events": [' + b", ".join(events) + b"]}"
        headers = [("Content-Type", ENVELOPE_MEDIA_TYPE), *self.endpoint.headers]
        try:
            async with self.session.post(self.endpoint.url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds)) as answer:
                if 200 <= answer.status < 300:
                    return None
                return f"the endpoint answered HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"delivery failed: {type(exc).__name__} {exc}".rstrip()


def _batch(records: list[OutboxRecord]) -> list[OutboxRecord]:
    """The oldest records holding up to BATCH_EVENTS events together (at least one record)."""
    taken, events = [], 0
    for record in records:
        events += record.data.count(b"\n") + 1
        if taken and events > BATCH_EVENTS:
            break
        taken.append(record)
    return taken


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
