"""HTTP to one registry endpoint: auth challenges (Bearer token flow, Basic), token cache,
retries with backoff. Credentials go only to the registry's own scheme+host+port: a URL the
registry names elsewhere (redirect, upload Location, Link) is followed without them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable
from urllib.parse import urljoin, urlsplit

from .aiohttp_loader import aiohttp
from .credentials import Credentials
from .errors import RegistryError, printable
from .registries import Endpoint

log = logging.getLogger("kura.client")

RETRY_STATUSES = {429, 500, 502, 503, 504}
TOKEN_LIMIT = 1 << 20
ERROR_LIMIT = 64 << 10
MAX_ATTEMPTS = 5
MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class AuthError(RegistryError):
    pass


class RateLimited(RegistryError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class RegistryClient:
    session: aiohttp.ClientSession
    endpoint: Endpoint
    credentials: Credentials | None = None
    on_rate_limit: Callable[[str], None] | None = None
    on_retry: Callable[[str], None] | None = None
    """Told what is retried and why (kura -v)."""
    on_response: Callable[[aiohttp.ClientResponse], None] | None = None
    """Shown every response of the registry itself (status, rate-limit headers), before it is used."""
    scheme: str | None = None
    """"http" or "https" when known (a configured URL); else probed, HTTPS first."""
    _scheme: str | None = None
    _challenge: tuple[str, dict] | None = None
    _tokens: dict[str, _Token] = field(default_factory=dict)
    _token_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- addressing -------------------------------------------------------------------
    async def base_url(self) -> str:
        if self._scheme is None:
            self._scheme = self.scheme or await self._probe_scheme()
        return f"{self._scheme}://{self.endpoint.api_host}"

    async def _probe_scheme(self) -> str:
        """HTTPS unless only plain HTTP answers on a host where that is allowed."""
        host = self.endpoint.api_host
        if not self.endpoint.plain_http_allowed:
            return "https"
        for scheme in ("https", "http"):
            try:
                async with self.session.get(f"{scheme}://{host}/v2/", ssl=False if self.endpoint.insecure else None,
                                            allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=10)) as r:
                    self._note_challenge(r)
                    return scheme
            except aiohttp.ClientConnectorDNSError as exc:
                raise RegistryError(cannot_resolve(exc)) from None
            except (aiohttp.ClientConnectorError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientSSLError, asyncio.TimeoutError):
                continue
        raise RegistryError(f"cannot reach registry {host} (tried HTTPS and HTTP)")

    def repo_path(self, suffix: str) -> str:
        return f"/v2/{self.endpoint.repository}/{suffix}"

    # -- auth -------------------------------------------------------------------------
    def _note_challenge(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 401 and "WWW-Authenticate" in response.headers:
            self._challenge = parse_challenge(response.headers["WWW-Authenticate"])

    async def _auth_header(self, scope: str) -> dict[str, str]:
        if self._challenge is None:
            return {}
        scheme, params = self._challenge
        if scheme == "basic":
            return self._basic() if self.credentials else {}
        if scheme != "bearer":
            raise AuthError(f"registry {self.endpoint.host} asks for unsupported auth scheme {scheme!r}")
        token = await self._token(params, scope)
        return {"Authorization": f"Bearer {token}"}

    def _basic(self) -> dict[str, str]:
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    def _refusal(self) -> str:
        """Why a 401 stands after fresh credentials were sent."""
        host = self.endpoint.host
        if not self.endpoint.repository:  # the registry itself (/v2/), as `kura login` asks it
            return (f"login to {host} failed: invalid username or password" if self.credentials
                    else f"{host} requires a login (kura login)")
        return (f"{host} refused access to {self.endpoint.repository}"
                + ("" if self.credentials else " (no credentials; kura login?)"))

    async def _token(self, params: dict, scope: str) -> str:
        async with self._token_lock:
            cached = self._tokens.get(scope)
            if cached and cached.expires > time.monotonic():
                return cached.value
            realm = params.get("realm")
            if not realm:
                raise AuthError(f"registry {self.endpoint.host} sent a Bearer challenge without a realm")
            realm_scheme = urlsplit(realm).scheme.lower()
            if realm_scheme not in ("http", "https"):
                raise AuthError(f"registry {self.endpoint.host} sent a Bearer realm that is not an HTTP(S) URL")
            if self._scheme == "https" and realm_scheme == "http" and not self.endpoint.insecure:
                raise AuthError(f"registry {self.endpoint.host} wants credentials sent to a plain-HTTP realm {realm}")
            body = await self._fetch_token(realm, params.get("service"), scope)
            token = body.get("token") or body.get("access_token")
            if not token:
                raise AuthError(f"the token service at {realm} answered without a token")
            lifetime = int(body.get("expires_in") or 60)
            self._tokens[scope] = _Token(token, time.monotonic() + max(lifetime - 10, 1))
            return token

    async def _fetch_token(self, realm: str, service: str | None, scope: str) -> dict:
        """OAuth2 POST first when we have a password (as containerd does), GET as fallback."""
        if self.credentials is not None:
            form = {"grant_type": "password", "username": self.credentials.username,
                    "password": self.credentials.password, "client_id": "kura", "scope": scope}
            if service:
                form["service"] = service
            async with self.session.post(realm, data=form, allow_redirects=False) as r:
                if r.status == 200:
                    return await _json_body(r, TOKEN_LIMIT, "token response")
                if r.status in (401, 403):
                    raise AuthError(f"login to {self.endpoint.host} failed: invalid username or password")
                # 404/405/400: an issuer that only knows the GET form.
        params = [("scope", scope)] if scope else []
        if service:
            params.append(("service", service))
        headers = self._basic() if self.credentials else {}
        async with self.session.get(realm, params=params, headers=headers, allow_redirects=False) as r:
            if r.status in (401, 403):
                raise AuthError(f"login to {self.endpoint.host} failed: invalid username or password"
                                if self.credentials else f"{self.endpoint.host} requires a login (kura login)")
            if r.status == 429:
                raise RateLimited(_rate_limit_message(self.endpoint.host, r))
            if r.status != 200:
                raise AuthError(f"token service at {realm} answered {r.status}")
            return await _json_body(r, TOKEN_LIMIT, "token response")

    # -- requests ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, *, scope: str, headers: dict | None = None,
                      ok: tuple[int, ...] = (200,), data: bytes | None = None,
                      retry: bool = True) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request with auth, retries and safe redirects. Yields the final response (its
        status is one of `ok`, or 404); raises RegistryError otherwise. `path` may also be a
        Location the registry gave (absolute, or relative to it)."""
        base = await self.base_url()
        url = urljoin(base + "/", path)
        delay = 0.5
        refreshed = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response = await self._send(method, url, scope, headers or {}, data)
            except aiohttp.ClientConnectorDNSError as exc:  # retrying will not make the name exist
                raise RegistryError(cannot_resolve(exc)) from None
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                if attempt == MAX_ATTEMPTS or not retry:
                    raise RegistryError(f"{self.endpoint.api_host}: {exc or type(exc).__name__}") from None
                self._retrying(method, url, delay, attempt, str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if self.on_response is not None and same_origin(str(response.url), base):
                self.on_response(response)
            if response.status == 401 and not same_origin(str(response.url), base):
                response.release()
                raise AuthError(f"{urlsplit(str(response.url)).netloc}, where {self.endpoint.host} sent us, "
                                "asks for credentials; Kura sends them only to the registry itself")
            if response.status == 401 and not refreshed:
                self._note_challenge(response)
                self._tokens.pop(scope, None)
                response.release()
                refreshed = True
                continue
            if response.status in RETRY_STATUSES and attempt < MAX_ATTEMPTS and retry:
                wait = _retry_after(response) if response.status == 429 else delay
                if response.status == 429 and self.on_rate_limit:
                    self.on_rate_limit(_rate_limit_message(self.endpoint.host, response))
                elif response.status != 429:
                    self._retrying(method, url, min(wait, 30), attempt, f"HTTP {response.status}")
                response.release()
                await asyncio.sleep(min(wait, 30))
                delay *= 2
                continue
            try:
                if response.status == 429:
                    raise RateLimited(_rate_limit_message(self.endpoint.host, response), _retry_after(response))
                if response.status == 401:
                    raise AuthError(self._refusal())
                if response.status not in ok and response.status != 404:
                    raise RegistryError(f"{method} {path} on {self.endpoint.api_host}: HTTP {response.status} "
                                        f"{await _error_text(response)}")
                yield response
            finally:
                response.release()
            return

    def _retrying(self, method: str, url: str, wait: float, attempt: int, reason: str) -> None:
        if self.on_retry:
            self.on_retry(f"retrying {method} {urlsplit(url).path} on {self.endpoint.api_host} in {wait:.1f} s "
                          f"(attempt {attempt + 1} of {MAX_ATTEMPTS}): {printable(reason)[:200]}")

    async def _send(self, method: str, url: str, scope: str, headers: dict, data: bytes | None = None
                    ) -> aiohttp.ClientResponse:
        """Follow redirects by hand: credentials go only to the registry's own origin."""
        base = await self.base_url()
        ssl = False if self.endpoint.insecure else None
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if same_origin(url, base):  # scheme too: never credentials over a downgrade
                sent.update(await self._auth_header(scope))
            response = await self.session.request(method, url, headers=sent, allow_redirects=False, ssl=ssl,
                                                  data=data)
            if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                url = urljoin(url, response.headers["Location"])
                response.release()
                continue
            return response
        raise RegistryError(f"too many redirects from {self.endpoint.api_host}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None when unparsable."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return None
    return scheme, parts.hostname or "", port if port is not None else _DEFAULT_PORTS.get(scheme)


def same_origin(url: str, other: str) -> bool:
    """Whether two URLs share scheme, host and port (https://h is https://h:443)."""
    origin = _origin(url)
    return origin is not None and origin == _origin(other)


def cannot_resolve(exc: aiohttp.ClientConnectorDNSError) -> str:
    reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
    return f"cannot resolve {exc.host}: {printable(reason)}"


def _retry_after(response: aiohttp.ClientResponse) -> float:
    try:
        return float(response.headers.get("Retry-After", "1"))
    except ValueError:
        return 1.0


def _rate_limit_message(host: str, response: aiohttp.ClientResponse) -> str:
    limit = printable(response.headers.get("ratelimit-limit", "unknown"))[:100]
    retry = printable(response.headers.get("Retry-After", "unknown"))[:100]
    return f"{host} rate limit reached (limit {limit}); retry after {retry} seconds"


async def read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes (without reading them)."""
    if response.content_length is not None and response.content_length > limit:
        raise RegistryError(f"{what} is larger than {limit} bytes")
    data = bytearray()
    try:
        while chunk := await response.content.read(65536):
            data += chunk
            if len(data) > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes")
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise RegistryError(f"{what}: the connection broke after {len(data)} bytes ({exc.__class__.__name__})") from None
    return bytes(data)


async def _json_body(response: aiohttp.ClientResponse, limit: int, what: str) -> dict:
    data = await read_limited(response, limit, what)
    try:
        body = json.loads(data)
    except ValueError:
        raise RegistryError(f"{what} is not JSON") from None
    if not isinstance(body, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return body


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await _json_body(response, ERROR_LIMIT, "error body")
        errors = body.get("errors") or []
        return printable("; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)))[:500]
    except RegistryError:
        return ""
