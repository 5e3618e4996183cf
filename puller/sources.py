"""What a push sends: a directory holding `blobs/<alg>/<hex>` (an OCI layout, the local store,
an unpacked archive) and the manifest or index to push; and the check of every local blob
against its digest before anything is sent.

Nothing here needs the HTTP stack, so `kura push` can start the checks as soon as it knows its
source: they run in threads (hashing and reading release the GIL) while the client is still
importing aiohttp, and two blobs are hashed at once."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ocispec.digest import Digest, new_hasher

from .errors import RegistryError

INDEX_LIMIT = 4 << 20
CHECK_CHUNK = 1 << 20
CHECK_THREADS = 2


class PushError(RegistryError):
    pass


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

    def blob_digests(self) -> list[str]:
        """The config and layer digests below the top manifest (index children included), as
        the local manifests name them (unchecked: a push checks each manifest it sends; a
        corrupt one may even name itself, so each is read once)."""
        digests, seen = [], set()
        pending = [self.top["digest"]]
        while pending:
            digest = pending.pop()
            path = self.blob(digest)
            if digest in seen or not path.exists():
                continue
            seen.add(digest)
            document = json.loads(path.read_bytes())
            pending += [m["digest"] for m in document.get("manifests", [])]
            digests += [d["digest"] for d in ([document["config"]] if "config" in document else [])
                        + document.get("layers", [])]
        return digests


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


class _Stopped(Exception):
    pass


def verify_file(path: Path, digest: Digest, stop: threading.Event | None = None) -> int:
    """The size of the local blob at `path`; PushError when its content is not `digest`."""
    hasher = new_hasher(digest.algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHECK_CHUNK):
            if stop is not None and stop.is_set():
                raise _Stopped()
            hasher.update(chunk)
            size += len(chunk)
    if hasher.hexdigest() != digest.encoded:
        raise PushError(f"local blob {digest} is corrupt (content hashes to {digest.algorithm}:{hasher.hexdigest()}); "
                        "nothing was sent")
    return size


class BlobChecks:
    """verify_file() of local blobs in threads, each (path, digest) once, the result kept for
    whoever asks for it later. close() abandons what is still running (at the next MiB), so an
    interrupted push exits without hashing on."""

    def __init__(self, threads: int = CHECK_THREADS):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kura-check")
        self._stop = threading.Event()
        self._started: dict[tuple[Path, str], Future] = {}
        self._lock = threading.Lock()

    def check(self, path: Path, digest: Digest) -> Future:
        """The size of the blob at `path` once it is checked (a concurrent Future)."""
        with self._lock:
            key = (path, str(digest))
            if key not in self._started:
                self._started[key] = self._pool.submit(verify_file, path, digest, self._stop)
            return self._started[key]

    def start(self, source: Source) -> None:
        """Start checking every blob the source's manifests name; a manifest that cannot be read
        is left for the push to report."""
        try:
            digests = source.blob_digests()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return
        for digest in digests:
            try:
                self.check(source.blob(digest), Digest.parse(digest))
            except ValueError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
