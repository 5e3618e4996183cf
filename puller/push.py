"""`kura push`: an image from the local store or an OCI layout to a registry.

Blobs first (HEAD, skip what exists; mount from `--mount-from`; else upload: one PUT for
small blobs, PATCH chunks honouring OCI-Chunk-Min-Length for large ones, resuming from the
server's Range after a break), every blob re-hashed from disk before it is sent; then
manifests, children before the index, the top one by tag, the registry's digest checked.

An upload session is remembered (in the local store) until its blob is committed (one sent in
a single PUT is not: nothing of it could be continued), so a push that was interrupted (or lost
the registry: a break, a timeout, a 5xx, a 429) continues it the next time; a push the
registry refuses for good (a 4xx, 507) cancels it. A push owns the
session of a blob while it sends it (a flock in the store), so two pushes from one store never
continue the same session at once: the second opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin
from typing import Callable, Protocol

from ocispec import mediatypes as mt
from ocispec.digest import Digest, new_hasher
from ocispec.reference import Reference

from .aiohttp_loader import aiohttp
from .credentials import Credentials
from .progress import Progress, Quiet
from .registries import Registries
from .transport import AuthError, RegistryClient, RegistryError, _error_text

MONOLITHIC_LIMIT = 8 << 20
DEFAULT_CHUNK = 16 << 20
MAX_CHUNK = 64 << 20  # whatever OCI-Chunk-Min-Length says, a chunk is held in memory
UPLOAD_ATTEMPTS = 5
UPLOAD_SESSIONS = 3
INDEX_LIMIT = 4 << 20


class PushError(RegistryError):
    pass


class Refused(PushError):
    """The registry refused for good (a 4xx other than 404/408/416/429, or 507 storage full):
    sending again cannot help, and the upload session is of no further use."""


ANY_STATUS = tuple(range(200, 600))  # answers the push reads itself, to tell a refusal from a break


def _final(status: int) -> bool:
    return status == 507 or (400 <= status < 500 and status not in (404, 408, 416, 429))


async def _failure(response: aiohttp.ClientResponse, what: str) -> PushError:
    text = await _error_text(response)
    return (Refused if _final(response.status) else PushError)(f"{what}: HTTP {response.status} {text}".rstrip())


@dataclass
class Source:
    """Where the bytes come from: a directory holding `blobs/<alg>/<hex>`."""
    root: Path
    top: dict  # descriptor of the manifest or index to push

    def blob(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.root / "blobs" / d.algorithm / d.encoded

    def read_manifest(self, digest: str) -> bytes:
        data = self.blob(digest).read_bytes()
        if Digest.of_bytes(data, Digest.parse(digest).algorithm) != Digest.parse(digest):
            raise PushError(f"local manifest {digest} is corrupt; refusing to push it")
        return data


def source_from_layout(directory: Path, tag: str | None) -> Source:
    if not directory.is_dir():
        raise PushError(f"{directory} {'is not a directory' if directory.exists() else 'does not exist'} "
                        "(oci:DIR[:TAG] needs an OCI image layout directory)")
    index_path = directory / "index.json"
    if not index_path.is_file() or index_path.stat().st_size > INDEX_LIMIT:
        raise PushError(f"{directory} is not an OCI image layout (no index.json, or an oversized one)")
    try:
        index = json.loads(index_path.read_bytes())
    except ValueError:
        raise PushError(f"{index_path} is not JSON") from None
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(isinstance(m, dict) and "digest" in m for m in entries):
        raise PushError(f"{index_path} is not an OCI image index")
    if tag is not None:
        entries = [m for m in entries if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(entries) != 1:
        raise PushError(f"{directory}: {'no image tagged ' + repr(tag) if tag else 'name a tag (oci:DIR:TAG)'}"
                        if not entries else f"{directory}: several images match; name one with oci:DIR:TAG")
    return Source(directory, entries[0])


class UploadSessions(Protocol):
    """Where unfinished uploads stand, per (registry, repository, digest): the store keeps them."""

    def upload_session(self, host: str, repository: str, digest: str) -> str | None: ...

    def remember_upload_session(self, host: str, repository: str, digest: str, location: str | None) -> None: ...

    def upload_claim(self, host: str, repository: str, digest: str) -> contextlib.AbstractContextManager[bool]:
        """True while this process alone owns the blob's session; False: another push does."""
        ...


@dataclass
class PushOptions:
    jobs: int = 4
    mount_from: str | None = None
    progress: Progress = field(default_factory=Quiet)
    known_sources: Callable[[str, str], list[str]] | None = None
    """(digest, host) -> repositories of that registry known to hold the blob (the store's records)."""
    verbose: bool = False
    sessions: UploadSessions | None = None


def verify_file(path: Path, digest: Digest) -> int:
    hasher = new_hasher(digest.algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    if hasher.hexdigest() != digest.encoded:
        raise PushError(f"local blob {digest} is corrupt (content hashes to {digest.algorithm}:{hasher.hexdigest()}); "
                        "nothing was sent")
    return size


class Pusher:
    def __init__(self, client: RegistryClient, source: Source, options: PushOptions):
        self.client = client
        self.source = source
        self.options = options
        repo = client.endpoint.repository
        self.scope = f"repository:{repo}:pull,push"
        if options.mount_from:
            self.scope += f" repository:{options.mount_from}:pull"
        self._sessions: dict[str, str] = {}  # digest -> Location of its open upload session
        self._owned: set[str] = set()  # digests whose session this push owns (and records in the store)

    def _path(self, suffix: str) -> str:
        return self.client.repo_path(suffix)

    async def blob(self, descriptor: dict) -> str:
        digest = Digest.parse(descriptor["digest"])
        name = digest.encoded[:12]
        path = self.source.blob(str(digest))
        size = descriptor["size"]  # verified by image() before anything was sent
        async with self.client.request("HEAD", self._path(f"blobs/{digest}"), scope=self.scope) as r:
            if r.status == 200:
                self.options.progress.done(name, "already there")
                return "exists"
        with self._claim(digest):
            return await self._send(digest, name, path, size)

    @contextlib.contextmanager
    def _claim(self, digest: Digest):
        """Own the recorded session of `digest` while it is sent, when no other push does."""
        if self.options.sessions is None:
            yield
            return
        endpoint = self.client.endpoint
        with self.options.sessions.upload_claim(endpoint.host, endpoint.repository, str(digest)) as owned:
            if owned:
                self._owned.add(str(digest))
            elif self.options.verbose:
                self._note(f"{digest.encoded[:12]}: another push from this store is sending it; opening a new upload")
            try:
                yield
            finally:
                self._owned.discard(str(digest))

    async def _send(self, digest: Digest, name: str, path: Path, size: int) -> str:
        resumed = await self._resume(digest, size)
        source = None if resumed else self.options.mount_from or self._known_source(str(digest))
        offset = 0
        if resumed:
            (location, offset), min_chunk = resumed, None
        elif source:
            query = f"?mount={digest}&from={source}"
            scope = self.scope if self.options.mount_from else f"{self.scope} repository:{source}:pull"
            async with self.client.request("POST", self._path(f"blobs/uploads/{query}"), scope=scope,
                                           ok=(201, 202)) as r:
                if r.status == 201:
                    self.options.progress.done(name, f"mounted from {source}")
                    return "mounted"
                location, min_chunk = _location(r), r.headers.get("OCI-Chunk-Min-Length")
        else:
            location, min_chunk = await self._start()
        # A blob sent in one PUT leaves nothing to continue: its session is not written to the store.
        recorded = bool(resumed) or size > MONOLITHIC_LIMIT
        await self._remember(digest, location, recorded)
        self.options.progress.start(name, size)
        try:
            await self._upload(location, path, digest, size, int(min_chunk) if min_chunk and min_chunk.isdigit() else 0,
                               offset)
        except (Refused, AuthError):
            await self._cancel(digest)
            raise
        # Any other failure (a break, a timeout, a 5xx, a 429) keeps the session recorded: the
        # next push asks the registry where it stands.
        await self._remember(digest, None, recorded)
        self.options.progress.done(name, "pushed")
        return "uploaded"

    def _note(self, text: str) -> None:
        if self.options.verbose:
            self.options.progress.message(text)

    async def _remember(self, digest: Digest, location: str | None, record: bool = True) -> None:
        """Where the upload of `digest` stands (None: finished or gone), here and, when this push
        owns the session, it moved and `record` says so, in the store (written off the event loop)."""
        if self._sessions.get(str(digest)) == location:
            return
        if location is None:
            self._sessions.pop(str(digest), None)
        else:
            self._sessions[str(digest)] = location
        if record:
            await self._record(digest, location)

    async def _record(self, digest: Digest, location: str | None) -> None:
        if self.options.sessions is not None and str(digest) in self._owned:
            endpoint = self.client.endpoint
            await asyncio.to_thread(self.options.sessions.remember_upload_session, endpoint.host,
                                    endpoint.repository, str(digest), location)

    async def _resume(self, digest: Digest, size: int) -> tuple[str, int] | None:
        """(location, offset) of the session an earlier, interrupted push left for this blob,
        when the registry still has it."""
        if str(digest) not in self._owned:  # another push is using it (or there are no records)
            return None
        endpoint = self.client.endpoint
        location = self.options.sessions.upload_session(endpoint.host, endpoint.repository, str(digest))
        if location is None:
            return None
        state = await self._status(location)  # a break or a busy registry: fail, keeping the record
        if state is None or state[1] > size:
            self._note(f"{digest.encoded[:12]}: the registry no longer has the upload an earlier push left; "
                       "starting again")
            if state is not None:  # it has more bytes than the blob: of no use
                self._sessions[str(digest)] = state[0]
                await self._cancel(digest)
            await self._record(digest, None)
            return None
        self._note(f"{digest.encoded[:12]}: continuing the upload an earlier push left, at byte {state[1]}")
        return state

    async def _cancel(self, digest: Digest) -> None:
        """Give up the upload session of `digest` (best effort): the registry can drop its bytes."""
        location = self._sessions.get(str(digest))
        await self._remember(digest, None)
        if location is None:
            return
        try:
            async with self.client.request("DELETE", location, scope=self.scope, ok=(202, 204), retry=False):
                pass
        except (RegistryError, aiohttp.ClientError, asyncio.TimeoutError):
            pass

    def _known_source(self, digest: str) -> str | None:
        if self.options.known_sources is None:
            return None
        repos = [r for r in self.options.known_sources(digest, self.client.endpoint.host)
                 if r != self.client.endpoint.repository]
        return repos[0] if repos else None

    async def _start(self) -> tuple[str, str | None]:
        async with self.client.request("POST", self._path("blobs/uploads/"), scope=self.scope, ok=(202,)) as r:
            if r.status != 202 or "Location" not in r.headers:
                raise PushError(f"{self.client.endpoint.host} did not start an upload ({r.status})")
            return _location(r), r.headers.get("OCI-Chunk-Min-Length")

    async def _upload(self, location: str, path: Path, digest: Digest, size: int, min_chunk: int,
                      offset: int = 0) -> None:
        name = digest.encoded[:12]
        if size <= MONOLITHIC_LIMIT and offset == 0:
            data = path.read_bytes()
            async with self.client.request("PUT", _with_digest(location, digest), scope=self.scope, ok=ANY_STATUS,
                                           data=data, headers={"Content-Type": "application/octet-stream"}) as r:
                if r.status != 201:
                    raise await _failure(r, f"upload of {digest} failed")
            self.options.progress.advance(name, size)
            return
        chunk_size = min(max(DEFAULT_CHUNK, min_chunk), MAX_CHUNK)
        sent, failures = offset, 0
        self.options.progress.advance(name, offset)
        sessions = 1
        with open(path, "rb") as f:
            while offset < size:
                f.seek(offset)
                chunk = f.read(chunk_size)
                if not chunk:
                    raise PushError(f"local blob {digest} shrank while it was being pushed")
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
                try:
                    # No automatic re-send: after a break, ask the server where the session is.
                    async with self.client.request("PATCH", location, scope=self.scope, ok=ANY_STATUS, data=chunk,
                                                   headers=headers, retry=False) as r:
                        if r.status == 202:
                            location = _location(r, location)
                            offset += len(chunk)
                        elif r.status == 416 and (resumed := _range_end(r.headers.get("Range"))) is not None:
                            location, offset = _location(r, location), resumed
                        else:
                            raise await _failure(r, f"upload of {digest} failed")
                    await self._remember(digest, location)
                except (Refused, AuthError):
                    raise  # sending it again cannot help
                except RegistryError as exc:
                    failures += 1
                    if failures >= UPLOAD_ATTEMPTS:
                        raise
                    self._note(f"{name}: {exc}; asking the registry where the upload stands")
                    await asyncio.sleep(0.5 * failures)
                    state = await self._status(location)
                    if state is None and await self._exists(digest):
                        return  # the session was finished meanwhile (by a push that took it over)
                    if state is None:  # the registry dropped the session: start again, a few times
                        sessions += 1
                        if sessions > UPLOAD_SESSIONS:
                            raise
                        self._note(f"{name}: the registry dropped the upload; starting a new one")
                        (location, _), offset = await self._start(), 0
                    else:
                        location, offset = state
                    await self._remember(digest, location)
                if offset > sent:
                    self.options.progress.advance(name, offset - sent)
                    sent = offset
        async with self.client.request("PUT", _with_digest(location, digest), scope=self.scope, ok=ANY_STATUS) as r:
            if r.status == 201:
                return
            failure = await _failure(r, f"finishing the upload of {digest} failed")
        if r.status == 404 and await self._exists(digest):
            return  # the session was finished meanwhile (by a push that took it over)
        raise failure

    async def _exists(self, digest: Digest) -> bool:
        async with self.client.request("HEAD", self._path(f"blobs/{digest}"), scope=self.scope) as r:
            return r.status == 200

    async def _status(self, location: str) -> tuple[str, int] | None:
        """(location, offset) of an upload session, None when the registry no longer has it (or
        refuses it for good); a break or a busy registry raises."""
        async with self.client.request("GET", location, scope=self.scope, ok=ANY_STATUS) as r:
            if r.status == 404 or _final(r.status):
                return None
            if r.status != 204:
                raise await _failure(r, "asking where the upload stands failed")
            end = _range_end(r.headers.get("Range"))
            return (_location(r, location), end) if end is not None else None

    async def manifest(self, descriptor: dict, reference: str) -> str:
        data = self.source.read_manifest(descriptor["digest"])
        document = json.loads(data)
        media_type = document.get("mediaType") or descriptor.get("mediaType") or mt.OCI_MANIFEST
        async with self.client.request("PUT", self._path(f"manifests/{reference}"), scope=self.scope, ok=(201,),
                                       data=data, headers={"Content-Type": media_type}) as r:
            if r.status != 201:
                raise PushError(f"the registry refused manifest {descriptor['digest']} (HTTP {r.status})")
            returned = r.headers.get("Docker-Content-Digest")
        if returned and returned != descriptor["digest"]:
            raise PushError(f"the registry stored the manifest as {returned}, not {descriptor['digest']}")
        return descriptor["digest"]

    async def image(self, descriptor: dict, reference: str) -> dict[str, int]:
        counts = {"exists": 0, "mounted": 0, "uploaded": 0}
        document = json.loads(self.source.read_manifest(descriptor["digest"]))
        if "manifests" in document:
            missing = [c["digest"] for c in document["manifests"] if not self.source.blob(c["digest"]).exists()]
            if missing:
                raise PushError(f"the index lists manifests that are not here: {', '.join(missing)}; "
                                "nothing was sent")
            for child in document["manifests"]:
                for k, v in (await self.image(child, child["digest"])).items():
                    counts[k] += v
        else:
            blobs = [document["config"], *document.get("layers", [])]
            for blob in blobs:  # every byte checked before the first one is sent
                size = verify_file(self.source.blob(blob["digest"]), Digest.parse(blob["digest"]))
                if size != blob["size"]:
                    raise PushError(f"local blob {blob['digest']} has {size} bytes, its descriptor says {blob['size']}")
            semaphore = asyncio.Semaphore(max(1, self.options.jobs))

            async def one(d: dict) -> str:
                async with semaphore:
                    return await self.blob(d)

            tasks = [asyncio.ensure_future(one(d)) for d in blobs]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                # Stop the others as an interruption would, so that their sessions stay resumable.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            for result in results:
                counts[result] += 1
        await self.manifest(descriptor, reference)
        return counts


def _location(response: aiohttp.ClientResponse, fallback: str | None = None) -> str:
    """The Location a registry sent, resolved against the URL that sent it."""
    location = response.headers.get("Location")
    if not location:
        if fallback is None:
            raise PushError("the registry sent no Location for the upload")
        return fallback
    return urljoin(str(response.url), location)


def _range_end(header: str | None) -> int | None:
    """The next offset from an upload `Range: 0-<last>` (`bytes=` tolerated); `0-0` is empty."""
    match = re.fullmatch(r"(?:bytes=)?0-([0-9]{1,19})", (header or "").strip())
    if not match:
        return None
    last = int(match.group(1))
    return last + 1 if last else 0


def _with_digest(location: str, digest: Digest) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


async def push(source: Source, destination: Reference, registries: Registries,
               credentials: Callable[[str], Credentials | None], options: PushOptions) -> tuple[str, dict]:
    endpoint = registries.endpoints(destination)[-1]  # mirrors are for pulling
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)) as s:
        client = RegistryClient(s, endpoint, credentials(endpoint.host),
                                on_retry=options.progress.message if options.verbose else None)
        pusher = Pusher(client, source, options)
        counts = await pusher.image(source.top, destination.reference)
    options.progress.close()
    return source.top["digest"], counts



