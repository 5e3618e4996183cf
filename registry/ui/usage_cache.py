"""Storage usage per repository for the web UI: `kura du`'s report (storage/usage.measure),
measured in the background at most every MAX_AGE_SECONDS and kept, so no page waits for a
walk of the whole store once a first report exists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from storage import StorageDriver, usage

log = logging.getLogger("kura.ui")

MAX_AGE_SECONDS = 300
# How long the first page shown waits for the first report before showing none.
FIRST_WAIT_SECONDS = 2.0


class UsageCache:
    def __init__(self, driver: StorageDriver, max_age: float = MAX_AGE_SECONDS):
        self.driver = driver
        self.max_age = max_age
        self.report: dict[str, usage.RepositoryUsage] = {}
        self.measured_at: float | None = None
        self._task: asyncio.Task | None = None

    def _refresh(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._measure())
        return self._task

    async def _measure(self) -> None:
        try:
            report = await usage.measure(self.driver)
        except Exception:
            log.exception("measuring storage usage for the web UI failed")
            return
        self.report = {row.name: row for row in report.repositories}
        self.measured_at = time.time()

    async def current(self, wait: bool = False) -> dict[str, usage.RepositoryUsage]:
        """The last report (empty before the first); starts a new measurement when it is
        stale. With `wait`, the first report is awaited for a moment."""
        if self.measured_at is None or time.time() - self.measured_at > self.max_age:
            task = self._refresh()
            if wait and self.measured_at is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), FIRST_WAIT_SECONDS)
        return self.report

    def forget(self) -> None:
        """Measure again on the next page (after a delete through the UI)."""
        self.measured_at = None if not self.report else 0.0

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
