"""Slow down password guessing.

Attempts are counted before the password is checked (so parallel guesses count too), per
client address and user name, and per client address overall (a looser bound, against
spraying many names). A success clears only that user's count from that address, so
logging in as oneself does not reset the count for someone else's name, and one client's
guessing does not lock out other users behind the same address. IPv6 clients are grouped
by /64, which one host can otherwise rotate through at will.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque

ADDRESS_FACTOR = 10
MAX_KEYS = 100_000


def client_bucket(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginLimiter:
    def __init__(self, attempts: int, window_seconds: int):
        self.attempts = attempts
        self.window = window_seconds
        self._attempts: dict[tuple, deque[float]] = {}

    def _keys(self, address: str, user: str) -> list[tuple[tuple, int]]:
        bucket = client_bucket(address)
        return [(("pair", bucket, user), self.attempts), (("address", bucket), self.attempts * ADDRESS_FACTOR)]

    def _recent(self, key: tuple, now: float) -> deque[float]:
        entries = self._attempts.get(key)
        if entries is None:
            return deque()
        while entries and entries[0] <= now - self.window:
            entries.popleft()
        if not entries:
            del self._attempts[key]
        return entries

    def begin(self, address: str, user: str) -> int:
        """Count an attempt; returns seconds to wait (0: go ahead and check the password)."""
        now = time.monotonic()
        wait = 0
        for key, limit in self._keys(address, user):
            entries = self._recent(key, now)
            if len(entries) >= limit:
                wait = max(wait, int(entries[0] + self.window - now) + 1)
        if wait:
            return wait
        for key, _ in self._keys(address, user):
            self._attempts.setdefault(key, deque()).append(now)
        while len(self._attempts) > MAX_KEYS:  # bound memory under a spray of names/addresses
            self._attempts.pop(next(iter(self._attempts)))
        return 0

    def succeeded(self, address: str, user: str) -> None:
        """A right password: forget this user's attempts from this client, and this attempt."""
        bucket = client_bucket(address)
        self._attempts.pop(("pair", bucket, user), None)
        overall = self._attempts.get(("address", bucket))
        if overall:
            overall.pop()
