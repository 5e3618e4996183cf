"""What the store holds, for /metrics: the numbers `kura du` reports (storage/usage.measure),
counted in the background and cached. Counting walks every repository and reads every
manifest, so it never runs on a scrape's request path: a scrape that finds the count older
than [metrics] usage_refresh_seconds starts one and answers with the previous numbers. With
`kura serve --workers N` at most one worker counts at a time, and none within the interval
of the last count by any of them (a lock and a time stamp in the workers' shared metrics
directory); the numbers of the newest count are the ones exposed, whichever worker made it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable

from storage import StorageDriver, usage

log = logging.getLogger("kura.metrics")


class Schedule:
    """When a count may start: at most one at a time and none within `interval` seconds of
    the end of the last one. `path`: a file shared by the processes that count (None: this
    process alone)."""

    def __init__(self, interval: float, path: Path | None = None):
        self.interval = interval
        self.path = path
        self._last = float("-inf")
        self._fd: int | None = None
        self._busy = False

    def begin(self) -> bool:
        if self._busy:
            return False
        if self.path is None:
            if time.time() - self._last < self.interval:
                return False
            self._busy = True
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process counts
            stamp = os.pread(fd, 64, 0).strip()
            if stamp and time.time() - float(stamp) < self.interval:
                os.close(fd)
                return False
        except (BlockingIOError, ValueError):  # another process counts now (or a torn stamp)
            os.close(fd)
            return False
        self._fd, self._busy = fd, True
        return True

    def end(self) -> None:
        now = time.time()
        self._last, self._busy = now, False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.pwrite(fd, f"{now:<32.6f}".encode(), 0)
            os.close(fd)  # releases the lock


class UsageCounter:
    def __init__(self, driver: StorageDriver, schedule: Schedule,
                 publish: Callable[[usage.StoreUsage, float], None]):
        self.driver = driver
        self.schedule = schedule
        self.publish = publish
        self.running: asyncio.Task | None = None

    def poke(self) -> None:
        """Start a count in the background if one is due."""
        if self.running is None and self.schedule.begin():
            self.running = asyncio.ensure_future(self._count())

    async def _count(self) -> None:
        try:
            started = time.perf_counter()
            report = await usage.measure(self.driver)
            self.publish(report, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("counting what the store holds for /metrics failed")
        finally:
            self.schedule.end()
            self.running = None

    async def close(self) -> None:
        if self.running is not None:
            self.running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.running
