"""Locks across every instance sharing a bucket, from S3 conditional writes alone.

A lease is an object created with If-None-Match: * (only one writer can create it) and
naming when it expires; its holder renews it with If-Match on its own etag while it works
and deletes it when done. A holder that died leaves a lease that expires: the next taker
replaces it with If-Match on the etag it read, so two takers cannot both win. No shared
secret, no sticky sessions and no coordination service: what the bucket guarantees
(strong read-after-write, atomic conditional PUT) is enough. Clocks of the instances must
agree within a small part of LEASE_SECONDS (they do under NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid

from .errors import RepositoryBusy
from .s3_objects import Bucket, Conflict

LEASE_SECONDS = 10.0  # a dead holder blocks others at most this long
RENEW_EVERY_SECONDS = LEASE_SECONDS / 3
FIRST_BACKOFF_SECONDS = 0.005
MAX_BACKOFF_SECONDS = 0.2

log = logging.getLogger("kura.storage")


class Lease:
    def __init__(self, bucket: Bucket, key: str, seconds: float = LEASE_SECONDS):
        self.bucket = bucket
        self.key = key
        self.seconds = seconds
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.took_over = False
        """The last take replaced an expired lease (its holder died)."""
        self._renewal: asyncio.Task | None = None
        self._lost = False
        self._valid_until = 0.0

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.seconds}).encode()

    async def try_take(self) -> bool:
        """One attempt: True when held now."""
        self.took_over = False
        self._lost = False
        started = time.monotonic()
        self._valid_until = started + self.seconds
        try:
            self.etag = await self.bucket.put(self.key, self._body(), create=True)
            return True
        except Conflict:
            pass
        current = await self.bucket.get(self.key)
        if current is None:
            return False  # released meanwhile: the caller tries again
        data, etag = current
        if not _expired(data):
            return False
        try:
            self.etag = await self.bucket.put(self.key, self._body(), if_match=etag)
        except Conflict:
            return False
        self.took_over = True
        return True

    async def take(self, wait: float) -> bool:
        deadline = time.monotonic() + wait
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            if await self.try_take():
                self._renewal = asyncio.create_task(self._renew_forever())
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    @property
    def lost(self) -> bool:
        """Held no longer: another may have taken it (renewal failed past its expiry)."""
        return self._lost or (self.etag is not None and time.monotonic() > self._valid_until)

    def check(self) -> None:
        """Raise RepositoryBusy once the lease is lost: whatever it guarded must stop."""
        if self.lost:
            raise RepositoryBusy(f"lost the lease {self.key} (the store was too slow to renew it)")

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                started = time.monotonic()
                self.etag = await self.bucket.put(self.key, self._body(), if_match=self.etag)
                self._valid_until = started + self.seconds
            except Conflict:
                log.error("lost the lease %s (it expired while held: the store was too slow)", self.key)
                self._lost = True
                return
            except Exception as exc:  # the store is failing: try again at the next turn
                log.warning("could not renew the lease %s: %s", self.key, exc)

    async def abandon(self) -> None:
        """Stop renewing without touching the object (a lost lease: it may be another's now)."""
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        self.etag = None

    async def release(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        if not self._lost and self.etag is not None:
            # Only while it is still ours (If-Match): never a successor's lease.
            await self.bucket.delete_if(self.key, self.etag)
        self.etag = None


def _expired(data: bytes) -> bool:
    try:
        return float(json.loads(data)["expires"]) < time.time()
    except (ValueError, KeyError, TypeError):
        return True  # unreadable: nobody can be relying on it


def is_live(data: bytes | None) -> bool:
    """Content of a lease object that has not expired."""
    return data is not None and not _expired(data)
