"""Slow down password guessing: failed logins per client address within a window."""

from __future__ import annotations

import time
from collections import deque


class LoginLimiter:
    def __init__(self, attempts: int, window_seconds: int):
        self.attempts = attempts
        self.window = window_seconds
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures

    def retry_after(self, address: str) -> int:
        """Seconds the address must wait before trying again; 0 when it may try now."""
        now = time.monotonic()
        failures = self._recent(address, now)
        if len(failures) < self.attempts:
            return 0
        return max(1, int(failures[0] + self.window - now) + 1)

    def failed(self, address: str) -> None:
        self._failures.setdefault(address, deque()).append(time.monotonic())
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
