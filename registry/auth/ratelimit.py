"""Slow down password guessing.

Only failed checks count, per client address and user name, and per client address overall
(a looser bound, against spraying many names). A check still running is not a failure, but
it holds one of the remaining tries: an attempt that would need more tries than are left
waits for the running checks to finish, then goes ahead or is refused. So parallel guesses
get no more checks than sequential ones, and parallel logins with the right password (a
client opening many connections at once) all succeed. A success clears only that user's
count from that address, so logging in as oneself does not reset the count for someone
else's name, and one client's guessing does not lock out other users behind the same
address. IPv6 clients are grouped by /64, which one host can otherwise rotate through at will.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import deque
from dataclasses import dataclass

ADDRESS_FACTOR = 10
# Failures through one trusted proxy, all its forwarded clients together: X-Forwarded-For is
# only as honest as the proxy (one that passes the client's header on unchanged, a tunnel, a
# port-forward), so rotating it must not buy unlimited guesses.
PROXY_FACTOR = 100
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


@dataclass(frozen=True)
class Client:
    """Who is logging in: an address, and the trusted proxy that named it (None: the peer)."""
    address: str
    proxy: str | None = None

    def __str__(self) -> str:
        return f"{self.address} (via {self.proxy})" if self.proxy else self.address


class LoginLimiter:
    def __init__(self, attempts: int, window_seconds: int):
        self.attempts = attempts
        self.window = window_seconds
        self._failures: dict[tuple, deque[float]] = {}
        self._checking: dict[tuple, int] = {}
        self._finished = asyncio.Event()  # set (and replaced) whenever a check ends

    def _keys(self, client: Client, user: str) -> list[tuple[tuple, int]]:
        bucket = client_bucket(client.address)
        keys = [(("pair", bucket, user), self.attempts), (("address", bucket), self.attempts * ADDRESS_FACTOR)]
        if client.proxy is not None:
            keys.append((("proxy", client_bucket(client.proxy)), self.attempts * PROXY_FACTOR))
        return keys

    def _recent(self, key: tuple, now: float) -> deque[float]:
        entries = self._failures.get(key)
        if entries is None:
            return deque()
        while entries and entries[0] <= now - self.window:
            entries.popleft()
        if not entries:
            del self._failures[key]
        return entries

    async def begin(self, client: Client, user: str) -> int:
        """Reserve a try; returns seconds to wait (0: go ahead, check the password, then
        call `end`). Waits while running checks hold the tries that are left."""
        while True:
            now = time.monotonic()
            wait, busy = 0, False
            for key, limit in self._keys(client, user):
                failures = self._recent(key, now)
                if len(failures) >= limit:
                    wait = max(wait, int(failures[0] + self.window - now) + 1)
                elif len(failures) + self._checking.get(key, 0) >= limit:
                    busy = True
            if wait:
                return wait
            if not busy:
                for key, _ in self._keys(client, user):
                    self._checking[key] = self._checking.get(key, 0) + 1
                return 0
            await self._finished.wait()

    def end(self, client: Client, user: str, right: bool | None) -> None:
        """A reserved try is over. `right`: True for the right password (forget this user's
        failures from this client), False for a wrong one (a failure), None for no verdict
        (the check could not run; no trace)."""
        now = time.monotonic()
        for key, _ in self._keys(client, user):
            left = self._checking.get(key, 0) - 1
            if left > 0:
                self._checking[key] = left
            else:
                self._checking.pop(key, None)
            if right is False:
                self._failures.setdefault(key, deque()).append(now)
        if right:
            self._failures.pop(("pair", client_bucket(client.address), user), None)
        while len(self._failures) > MAX_KEYS:  # bound memory under a spray of names/addresses
            self._failures.pop(next(iter(self._failures)))
        self._finished.set()
        self._finished = asyncio.Event()
