"""Talking to one upstream registry, through the client library's transport (token flow,
same-origin credentials, safe redirects): one client per upstream repository, so tokens are
reused; what the upstream says about its rate limit is kept and logged."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from puller import credentials as docker_credentials
from puller.credentials import Credentials, CredentialsError
from puller.registries import Endpoint
from puller.transport import RegistryClient, printable

from ..monitoring.recorder import Recorder
from .config import Proxy

log = logging.getLogger("kura.proxy")

MAX_CLIENTS = 1024  # upstream repositories with a client (and its tokens) kept
LOW_REMAINING_FRACTION = 0.1  # warn when fewer pulls than this share of the limit remain
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=60)
DOWN_BACKOFF_SECONDS = 30.0


@dataclass
class RateLimit:
    limit: str | None = None
    remaining: str | None = None
    seen_at: float | None = None
    last_429_at: float | None = None

    def to_json(self) -> dict:
        return {"limit": self.limit, "remaining": self.remaining, "seen_at": self.seen_at,
                "last_429_at": self.last_429_at}


class Upstream:
    def __init__(self, proxy: Proxy, session: aiohttp.ClientSession, recorder: Recorder | None = None):
        self.proxy = proxy
        self.session = session
        self.recorder = recorder or Recorder()
        self.credentials = _credentials(proxy)
        self.rate_limit = RateLimit()
        self.requests = 0
        self.failures = 0
        self.last_failure: str | None = None
        self.down_until = 0.0
        self._clients: OrderedDict[str, RegistryClient] = OrderedDict()

    def client(self, upstream_name: str) -> RegistryClient:
        client = self._clients.get(upstream_name)
        if client is None:
            endpoint = Endpoint(self.proxy.host, upstream_name, insecure=self.proxy.scheme == "http")
            client = RegistryClient(self.session, endpoint, self.credentials, scheme=self.proxy.scheme,
                                    on_response=self._observe)
            self._clients[upstream_name] = client
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(upstream_name)
        return client

    def failed(self, reason: str, unreachable: bool = False) -> None:
        self.recorder.upstream_failure(self.proxy.name)
        self.failures += 1
        self.last_failure = reason
        if unreachable:
            self.down_until = time.monotonic() + DOWN_BACKOFF_SECONDS

    @property
    def down(self) -> bool:
        """Unreachable moments ago: stale content is served without asking it again (a
        black-holed upstream would otherwise cost every request a connect time-out)."""
        return time.monotonic() < self.down_until

    def _observe(self, response: aiohttp.ClientResponse) -> None:
        self.requests += 1
        headers = response.headers
        if response.status == 429:
            self.rate_limit.last_429_at = time.time()
            log.warning("upstream %s answered 429 (rate limited) for %s %s; limit %s, remaining %s, retry after %s s",
                        self.proxy.remote, response.method, response.url.path,
                        _header(headers, "ratelimit-limit"), _header(headers, "ratelimit-remaining"),
                        _header(headers, "Retry-After"))
        if "ratelimit-limit" not in headers and "ratelimit-remaining" not in headers:
            self.recorder.upstream_response(self.proxy.name, response.status, None, None)
            return
        limit, remaining = _header(headers, "ratelimit-limit"), _header(headers, "ratelimit-remaining")
        self.rate_limit.limit, self.rate_limit.remaining, self.rate_limit.seen_at = limit, remaining, time.time()
        log.debug("upstream %s rate limit: %s remaining of %s", self.proxy.remote, remaining, limit)
        left, total = _leading_int(remaining), _leading_int(limit)
        self.recorder.upstream_response(self.proxy.name, response.status, total, left)
        if left is not None and total and left <= total * LOW_REMAINING_FRACTION:
            log.warning("upstream %s rate limit nearly used up: %s remaining of %s", self.proxy.remote,
                        remaining, limit)

    def status(self) -> dict:
        return {"prefix": self.proxy.prefix, "remote": self.proxy.remote, "requests": self.requests,
                "failures": self.failures, "last_failure": self.last_failure,
                "rate_limit": self.rate_limit.to_json()}


def _credentials(proxy: Proxy) -> Credentials | None:
    if proxy.username is not None:
        return Credentials(proxy.username, proxy.password or "")
    try:
        return docker_credentials.lookup(proxy.host)
    except CredentialsError as exc:
        log.warning("upstream %s: cannot read credentials from the Docker config: %s", proxy.remote, exc)
        return None


def _header(headers, name: str) -> str | None:
    value = headers.get(name)
    return printable(value)[:100] if value is not None else None


def _leading_int(value: str | None) -> int | None:
    """`100;w=21600` (Docker Hub's form) -> 100."""
    head = (value or "").split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None
