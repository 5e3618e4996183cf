"""An emulated Docker Hub on loopback, built from Kura itself, for tests of what talks to Docker Hub.

Two real HTTP servers on 127.0.0.1 in the test's own event loop, on two ports:

- the token service (auth.docker.io): a Kura app in token mode, issuer "auth.docker.io",
  service "registry.docker.io", with the user alice and Docker Hub's access: anyone may pull
  `library/*` and `public/*`, alice may pull and push `acme/*`;
- the registry (registry-1.docker.io): a second Kura app trusting that issuer's certificate
  (`[auth.external]`), whose Bearer challenge sends clients to the token service's port.

The registry serves the shared images in Docker Hub's layout (tests/support/hub_content.py):
`library/redis:7` and `:latest` (an OCI index: linux/amd64, linux/arm64/v8 and a buildkit
attestation manifest for each), `library/debian:bookworm`, `library/busybox:latest` and the
private `acme/private:1`. Around Kura it behaves as Docker Hub does (rate-limit headers on
manifests, 429 once the pulls are used up; on request, blob GETs redirected to a "CDN" on a
third port) and it takes orders from the test: record every request, fail, go down and come
back, poison or slow down blob bodies, move tags.

    async with emulated_hub(tmp_path) as hub:
        await kura(home, "pull", f"{hub.registry_host}/library/redis:7")
        assert hub.count("GET", "/manifests/") and hub.token_requests
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from ocispec.digest import Digest
from registry.app import make_app
from registry.blob_response import serve_blob
from registry.context import parse_digest, repository
from registry.errors import BlobUnknown, RegistryError
from registry.auth import htpasswd
from registry.auth.config import parse as parse_auth
from registry.config import Config
from registry.serve import handler_settings
from storage import FilesystemDriver
from storage import manifests as stored_manifests

from . import hub_content
from .hub_content import Seeded, copy_store, seeded_store

SERVICE = "registry.docker.io"
ISSUER = "auth.docker.io"
USERNAME = "alice"
PASSWORD = "alice-hub-password"
RATE_WINDOW_SECONDS = 21600  # Docker Hub counts pulls over six hours
RATE_LIMITED_MESSAGE = ("You have reached your pull rate limit. You may increase the limit by authenticating "
                        "and upgrading: https://www.docker.com/increase-rate-limit")
ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}
# A stopped server cuts off what is in flight after this long, as a crashing upstream would.
SHUTDOWN_SECONDS = 0.1
# Where Docker Hub's CDN keeps blobs (the path of its 307 Location), and how long a link lasts.
CDN_BLOBS = "/registry-v2/docker/registry/v2/blobs"
CDN_LINK_SECONDS = 1200


@dataclass
class Seen:
    """One request as the hub saw it. `status` is what was answered (None while no answer
    has been started, or when the connection was cut before one)."""
    method: str
    path: str
    status: int | None
    had_authorization: bool
    query: str = ""


SEEN = web.RequestKey("hub-seen", Seen)


@dataclass
class RateLimit:
    """Docker Hub's pull counter: manifest GETs count, HEADs do not."""
    limit: int = 100
    remaining: int = 100
    retry_after: int = 60

    def headers(self, source: str) -> dict[str, str]:
        return {"ratelimit-limit": f"{self.limit};w={RATE_WINDOW_SECONDS}",
                "ratelimit-remaining": f"{self.remaining};w={RATE_WINDOW_SECONDS}",
                "docker-ratelimit-source": source}


@dataclass
class _Failure:
    status: int
    times: int | None  # None: until cleared
    path_contains: str | None


@dataclass
class Faults:
    """What the registry does wrong right now (set through EmulatedHub's methods)."""
    failure: _Failure | None = None
    corrupted: set[str] = field(default_factory=set)
    chunk_bytes: int = 16 * 1024
    chunk_delay: float | None = None
    hold_after: int | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    redirect_blobs: bool = False

    def failure_for(self, request: web.Request) -> int | None:
        rule = self.failure
        if rule is None or (rule.path_contains and rule.path_contains not in request.path):
            return None
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                self.failure = None
        return rule.status

    def tampers(self, digest: str) -> bool:
        return digest in self.corrupted or self.chunk_delay is not None or self.hold_after is not None


class HubStore(FilesystemDriver):
    """Kura's filesystem store, serving tampered blob bodies when told to: one byte flipped
    (the same length, so the same headers), small pieces with pauses, or a hold after some
    bytes. A tampered blob is streamed through read_blob instead of sendfile()."""

    def __init__(self, root: Path, faults: Faults):
        super().__init__(root)
        self.faults = faults

    async def stat_blob(self, digest: Digest):
        blob = await super().stat_blob(digest)
        if blob is not None and self.faults.tampers(str(digest)):
            return dataclasses.replace(blob, local_path=None)
        return blob

    async def read_blob(self, digest: Digest, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        faults = self.faults
        if not faults.tampers(str(digest)):
            async for chunk in super().read_blob(digest, start, length):
                yield chunk
            return
        flip = self.layout.blob(digest).stat().st_size // 2 if str(digest) in faults.corrupted else None
        paced = faults.chunk_delay is not None or faults.hold_after is not None
        offset, sent = start, 0
        async for chunk in super().read_blob(digest, start, length):
            if flip is not None and offset <= flip < offset + len(chunk):
                chunk = chunk[:flip - offset] + bytes([chunk[flip - offset] ^ 0xFF]) + chunk[flip - offset + 1:]
            offset += len(chunk)
            step = faults.chunk_bytes if paced else len(chunk)
            for at in range(0, len(chunk), step):
                if faults.hold_after is not None and sent >= faults.hold_after:
                    await faults.released.wait()
                piece = chunk[at:at + step]
                yield piece
                sent += len(piece)
                if faults.chunk_delay:
                    await asyncio.sleep(faults.chunk_delay)


class Listener:
    """One app on a loopback port that stays its own across stop() and start()."""

    def __init__(self, make: Callable[[], tuple[web.Application, Config]]):
        self._make = make
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        app, config = self._make()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS, **handler_settings(config))
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening (connections are refused) and cut off the connections still open."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _observer(log: list[Seen]):
    @web.middleware
    async def observe(request: web.Request, handler) -> web.StreamResponse:
        seen = Seen(request.method, request.path, None, "Authorization" in request.headers, request.query_string)
        log.append(seen)
        request[SEEN] = seen
        return await handler(request)
    return observe


async def _note_status(request: web.Request, response: web.StreamResponse) -> None:
    seen = request.get(SEEN)
    if seen is not None:
        seen.status = response.status


def _observed(app: web.Application, log: list[Seen]) -> web.Application:
    app.middlewares.insert(0, _observer(log))
    app.on_response_prepare.append(_note_status)
    return app


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    body = {"errors": [{"code": ERROR_CODES.get(status, "UNKNOWN"), "message": message}]}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


def _is_manifest(request: web.Request) -> bool:
    return "reference" in request.match_info and request.method in ("GET", "HEAD")


def _is_blob_get(request: web.Request) -> bool:
    return request.method == "GET" and "digest" in request.match_info and "/blobs/" in request.path


class EmulatedHub:
    """Handles of a running hub; see the module docstring, and emulated_hub() to get one."""
    username = USERNAME
    password = PASSWORD
    service = SERVICE
    issuer = ISSUER

    def __init__(self, workdir: Path, seeded: Seeded):
        self.workdir = workdir
        self.root = workdir / "registry"  # the registry's Kura store
        self.seeded = seeded
        self.requests: list[Seen] = []
        self.token_requests: list[Seen] = []
        self.rate_limit = RateLimit()
        self.faults = Faults()
        self.store = FilesystemDriver(self.root)  # the hub's own writes (push_image, retag)
        self.cdn_requests: list[Seen] = []
        self.token_service = Listener(self._token_app)
        self.registry = Listener(self._registry_app)
        self.cdn = Listener(self._cdn_app)

    # -- addresses --------------------------------------------------------------------
    @property
    def registry_host(self) -> str:
        return f"127.0.0.1:{self.registry.port}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.registry_host}"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.token_service.port}/auth/token"

    def registries_conf(self, path: Path) -> Path:
        """A registries.conf sending docker.io to this hub (for `kura pull redis`)."""
        path.write_text(f'[[registry]]\nprefix = "docker.io"\nlocation = "{self.registry_host}"\ninsecure = true\n')
        return path

    # -- the three apps ---------------------------------------------------------------
    def _token_app(self) -> tuple[web.Application, Config]:
        auth = parse_auth({"mode": "token", "service": SERVICE, "issuer": ISSUER, "rules": [
            {"repositories": ["library/*", "public/*"], "anonymous": True, "actions": ["pull"]},
            {"repositories": ["acme/*"], "users": [USERNAME], "actions": ["pull", "push"]},
        ]})
        config = Config(root=self.workdir / "token-service", listen=f"127.0.0.1:{self.token_service.port}",
                        access_log=False, gc_interval_seconds=0, auth=auth)
        return _observed(make_app(config), self.token_requests), config

    def _registry_app(self) -> tuple[web.Application, Config]:
        certificate = self.workdir / "token-service" / "auth" / "token-signing.crt"
        auth = parse_auth({"mode": "token", "external": {
            "realm": self.token_url, "service": SERVICE, "issuer": ISSUER, "certificate": str(certificate)}})
        config = Config(root=self.root, listen=f"127.0.0.1:{self.registry.port}", access_log=False,
                        gc_interval_seconds=0, auth=auth)
        app = make_app(config, HubStore(self.root, self.faults))
        app.middlewares.insert(0, self._docker_hub_behaviour())
        app.middlewares.append(self._cdn_redirect())  # innermost: only once the request is authorized
        return _observed(app, self.requests), config

    def _cdn_app(self) -> tuple[web.Application, Config]:
        """Blobs by digest, as the CDN that Docker Hub redirects blob GETs to: no auth, the
        same faults (corrupt, slow, held) as the registry's own blob bodies."""
        store = HubStore(self.root, self.faults)

        async def get_blob(request: web.Request) -> web.StreamResponse:
            info = request.match_info
            try:
                blob = await store.stat_blob(parse_digest(f"{info['algorithm']}:{info['encoded']}"))
            except RegistryError:
                blob = None
            if blob is None:
                return web.Response(status=404, text="NoSuchKey")
            return await serve_blob(request, blob, store)

        async def as_a_cdn(request: web.Request, response: web.StreamResponse) -> None:
            response.headers.pop("Docker-Content-Digest", None)  # a CDN knows nothing of registries

        app = web.Application()
        app.router.add_get(CDN_BLOBS + "/{algorithm}/{prefix}/{encoded}/data", get_blob)
        app.on_response_prepare.append(as_a_cdn)
        return _observed(app, self.cdn_requests), Config(root=self.root, access_log=False)

    def _cdn_redirect(self):
        @web.middleware
        async def redirect(request: web.Request, handler) -> web.StreamResponse:
            if not (self.faults.redirect_blobs and _is_blob_get(request)):
                return await handler(request)
            digest = parse_digest(request.match_info["digest"])
            if not await self.store.is_blob_linked(repository(request), digest) \
                    or await self.store.stat_blob(digest) is None:
                raise BlobUnknown(detail={"digest": str(digest)})
            expires = int(time.time()) + CDN_LINK_SECONDS
            signature = hashlib.sha256(f"{digest}{expires}".encode()).hexdigest()[:32]
            location = (f"http://127.0.0.1:{self.cdn.port}{CDN_BLOBS}/{digest.algorithm}/{digest.encoded[:2]}/"
                        f"{digest.encoded}/data?verify={expires}-{signature}")
            return web.Response(status=307, headers={"Location": location}, content_type="application/octet-stream")
        return redirect

    def _docker_hub_behaviour(self):
        @web.middleware
        async def behave(request: web.Request, handler) -> web.StreamResponse:
            status = self.faults.failure_for(request)
            if status is not None:
                return _error(status, f"the emulated hub was told to answer {status}")
            if not _is_manifest(request):
                return await handler(request)
            response = await handler(request)
            if response.status == 401:  # the challenge comes before any counting
                return response
            limits = self.rate_limit
            headers = limits.headers(request.remote or "127.0.0.1")
            if request.method == "GET":
                if limits.remaining <= 0:
                    return _error(429, RATE_LIMITED_MESSAGE, {**headers, "Retry-After": str(limits.retry_after)})
                if response.status == 200:
                    limits.remaining -= 1
                    headers = limits.headers(request.remote or "127.0.0.1")
            response.headers.update(headers)
            return response
        return behave

    # -- running ----------------------------------------------------------------------
    async def stop(self) -> None:
        """The registry goes down: connections are refused, those open are cut off."""
        await self.registry.stop()

    async def start(self) -> None:
        """The registry comes back on the same port with the same content."""
        await self.registry.start()

    # -- what it saw ------------------------------------------------------------------
    def count(self, method: str | None = None, path_contains: str | None = None, status: int | None = None,
              *, among: list[Seen] | None = None) -> int:
        """How many registry requests (or those of `among`: hub.token_requests, hub.cdn_requests)
        match all the given conditions."""
        return sum(1 for s in (self.requests if among is None else among)
                   if (method is None or s.method == method)
                   and (path_contains is None or path_contains in s.path)
                   and (status is None or s.status == status))

    # -- knobs ------------------------------------------------------------------------
    def set_rate_limit(self, limit: int, remaining: int | None = None, retry_after: int | None = None) -> None:
        self.rate_limit.limit = limit
        self.rate_limit.remaining = limit if remaining is None else remaining
        if retry_after is not None:
            self.rate_limit.retry_after = retry_after

    def fail_with(self, status: int | None, *, times: int | None = None, path_contains: str | None = None) -> None:
        """Answer every registry request (or the next `times`, or those whose path holds
        `path_contains`) with `status` and a distribution error body; None clears it."""
        self.faults.failure = None if status is None else _Failure(status, times, path_contains)

    def corrupt_blob(self, digest: str, corrupt: bool = True) -> None:
        """Serve this blob with its middle byte flipped: same length, same headers."""
        (self.faults.corrupted.add if corrupt else self.faults.corrupted.discard)(digest)

    def slow_blobs(self, bytes_per_second: float | None = None, *, delay: float | None = None,
                   chunk_bytes: int = 16 * 1024) -> None:
        """Send blob bodies in `chunk_bytes` pieces, pausing `delay` seconds (or what keeps
        to `bytes_per_second`) after each; no arguments: full speed again."""
        self.faults.chunk_bytes = chunk_bytes
        self.faults.chunk_delay = chunk_bytes / bytes_per_second if bytes_per_second else delay

    def hold_blobs(self, after_bytes: int = 64 * 1024) -> None:
        """Blob bodies stop after `after_bytes` (headers sent) until release_blobs()."""
        if self.faults.released.is_set():  # else bodies held already wait on the same event
            self.faults.released = asyncio.Event()
        self.faults.hold_after = after_bytes

    def release_blobs(self) -> None:
        self.faults.hold_after = None
        self.faults.released.set()

    def redirect_blobs(self, redirect: bool = True) -> None:
        """Answer authorized blob GETs with 307 to the CDN (hub.cdn, requests in
        hub.cdn_requests), as Docker Hub does; HEADs stay with the registry."""
        self.faults.redirect_blobs = redirect

    def clear_faults(self) -> None:
        self.release_blobs()
        self.faults.failure = None
        self.faults.corrupted.clear()
        self.slow_blobs()

    # -- content ----------------------------------------------------------------------
    async def resolve(self, repository: str, tag: str) -> str | None:
        digest = await self.store.resolve_tag(repository, tag)
        return None if digest is None else str(digest)

    async def retag(self, repository: str, tag: str, digest: str) -> None:
        """Point a tag at a manifest the repository already holds (as a push of it would)."""
        parsed = Digest.parse(digest)
        if await self.store.get_manifest_link(repository, parsed) is None:
            raise ValueError(f"{repository} holds no manifest {digest}")
        async with self.store.repository_lock(repository):
            await self.store.set_tag(repository, tag, parsed)

    async def delete_tag(self, repository: str, tag: str) -> bool:
        return await stored_manifests.delete_tag(self.store, repository, tag)

    async def push_blob(self, repository: str, data: bytes) -> str:
        return (await hub_content.put_blob(self.store, repository, data))["digest"]

    async def push_manifest(self, repository: str, data: bytes, media_type: str, tags: tuple[str, ...] = ()) -> str:
        """Store a manifest (its blobs and children must be in the repository); its digest."""
        return await hub_content.put_manifest(self.store, repository, data, media_type, tags)

    async def push_image(self, repository: str, tag: str, files: dict[str, bytes] | None = None,
                         architecture: str = "amd64") -> str:
        """A new small one-layer linux image tagged `tag` (by default unique, so the tag
        moves to a digest no one has seen); its manifest digest."""
        files = files or {"hub.txt": f"{repository}:{tag} {uuid.uuid4()}\n".encode()}
        return await hub_content.put_small_image(self.store, repository, files, (tag,), architecture)


@contextlib.asynccontextmanager
async def emulated_hub(tmp_path: Path, *, seed_cache: Path | None = None) -> AsyncIterator[EmulatedHub]:
    """A running hub with its files under `tmp_path`. The seeded content is built once per
    `seed_cache` (default: beside `tmp_path`, in pytest's temporary root for the session)."""
    seed, seeded = await seeded_store(seed_cache or tmp_path.parent / "fake-hub-seed")
    tmp_path.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hub-", dir=tmp_path))
    copy_store(seed, workdir / "registry")
    htpasswd.set_user(workdir / "token-service" / "auth" / "htpasswd", USERNAME, PASSWORD, cost=4)
    hub = EmulatedHub(workdir, seeded)
    try:
        await hub.token_service.start()  # first: it creates the certificate the registry trusts
        await hub.registry.start()
        await hub.cdn.start()
        yield hub
    finally:
        hub.release_blobs()
        await hub.cdn.stop()
        await hub.registry.stop()
        await hub.token_service.stop()
