"""The local image store: an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`).

Images are `index.json` entries annotated with `org.opencontainers.image.ref.name` = the full
normalised reference. Blobs are stored once, written to a temp file, verified, then renamed.
`index.json` changes under an exclusive flock and are written atomically, so concurrent
`kura pull`s into one store cannot corrupt it. Kura's own scratch space is `.kura/`:

    .kura/partial/<alg>-<hex>   a download not finished yet (resumed by the next pull; flocked
                                while a pull writes it, so two pulls never write one file)
    .kura/uploads.json          upload sessions a push left unfinished, to continue them
    .kura/uploads/<hash>        flocked by the push that owns a blob's session (while it does)
    .kura/sources.json          where blobs were seen, for cross-repository mounts
    .kura/holds/<id>            an image a container uses (`kura rmi` refuses to remove it)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ocispec import mediatypes as mt
from ocispec.digest import Digest

REF_NAME = "org.opencontainers.image.ref.name"
PARTIAL_MAX_AGE = 7 * 24 * 3600
"""Seconds an untouched partial download (or upload session record) is kept for resuming;
older ones are removed when the store is cleaned (`kura rmi`)."""


class StoreError(ValueError):
    pass


def default_store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kura" / "store"


@dataclass(frozen=True)
class Image:
    reference: str
    descriptor: dict


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.scratch = self.root / ".kura"
        self.scratch.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            _write_atomic(layout, b'{"imageLayoutVersion": "1.0.0"}', self.scratch)
        if not (self.root / "index.json").exists():
            with self.locked():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []})

    # -- blobs ------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        Digest.parse(str(digest))  # no path tricks through a hand-made Digest
        return self.root / "blobs" / digest.algorithm / digest.encoded

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        try:
            actual = self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    # -- partial downloads ------------------------------------------------------------
    def partial_path(self, digest: Digest) -> Path:
        Digest.parse(str(digest))
        return self.scratch / "partial" / f"{digest.algorithm}-{digest.encoded}"

    @contextlib.contextmanager
    def partial(self, digest: Digest):
        """The partial download of `digest`, opened read-write and exclusively flocked, or None
        while another process holds it (ask again later). Whoever holds it may append to it,
        truncate it, remove it or install it as the blob."""
        path = self.partial_path(digest)
        path.parent.mkdir(exist_ok=True)
        with _locked_file(path) as file:
            yield file

    def clean_partials(self, max_age: float = PARTIAL_MAX_AGE) -> int:
        """Remove partial downloads and temp files nobody touched for `max_age` seconds (never
        one a pull holds); returns how many went."""
        cutoff = time.time() - max_age
        removed = 0
        partials = self.scratch / "partial"
        for path in sorted(partials.iterdir()) if partials.is_dir() else []:
            if _older(path, cutoff):
                with _locked_file(path, create=False) as file:
                    if file is not None:
                        path.unlink()
                        removed += 1
        for path in self.scratch.iterdir():  # a killed process's temp files and archive scratch
            if path.suffix in (".tmp", ".partial") and _older(path, cutoff):
                path.unlink(missing_ok=True)
                removed += 1
            elif path.name.startswith("kura-push-") and path.is_dir() and _older(path, cutoff):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def install(self, temp: Path, digest: Digest) -> None:
        """Move a fully verified temp file into place as blob `digest`."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)

    def put_bytes(self, data: bytes, digest: Digest) -> None:
        if Digest.of_bytes(data, digest.algorithm) != digest:
            raise StoreError(f"refusing to store bytes that do not match {digest}")
        if not self.has_blob(digest, len(data)):
            target = self.blob_path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, data, self.scratch)

    def read_blob(self, digest: Digest) -> bytes:
        return self.blob_path(digest).read_bytes()

    def read_json(self, digest: Digest, limit: int, what: str) -> dict:
        """A stored manifest or config as a JSON object, refused unread when over `limit` bytes."""
        with open(self.blob_path(digest), "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise StoreError(f"{what} {digest} is larger than {limit} bytes; refusing to read it")
            data = f.read(limit + 1)
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise StoreError(f"{what} {digest} is not JSON (or is nested too deeply)") from None
        if not isinstance(document, dict):
            raise StoreError(f"{what} {digest} is not a JSON object")
        return document

    # -- index ------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """Exclusive: index.json is being read-modified-written."""
        with _flocked(self.scratch / "lock", fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def pinned(self):
        """Shared, held by a pull from its first blob to its index entry: blobs it has
        stored but not yet recorded must not look unused to a concurrent `rmi`."""
        with _flocked(self.scratch / "gc.lock", fcntl.LOCK_SH):
            yield

    def _read_index(self) -> dict:
        try:
            return json.loads((self.root / "index.json").read_text())
        except (FileNotFoundError, ValueError) as exc:
            raise StoreError(f"{self.root}/index.json is unreadable: {exc}") from None

    def _write_index(self, index: dict) -> None:
        _write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode(), self.scratch)

    def images(self) -> list[Image]:
        return [Image(m.get("annotations", {}).get(REF_NAME, ""), m) for m in self._read_index()["manifests"]]

    def find(self, reference: str) -> Image | None:
        return next((i for i in self.images() if i.reference == reference), None)

    def add(self, reference: str, descriptor: dict) -> None:
        entry = dict(descriptor)
        entry["annotations"] = {**descriptor.get("annotations", {}), REF_NAME: reference}
        with self.locked():
            index = self._read_index()
            index["manifests"] = [m for m in index["manifests"]
                                  if m.get("annotations", {}).get(REF_NAME) != reference] + [entry]
            self._write_index(index)

    def remove(self, reference: str) -> list[Digest]:
        """Drop a reference, then every blob no remaining image needs; returns those removed."""
        with _flocked(self.scratch / "gc.lock", fcntl.LOCK_EX), self.locked():
            index = self._read_index()
            kept = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != reference]
            if len(kept) == len(index["manifests"]):
                raise StoreError(f"no image {reference} in the store")
            digests = {m["digest"] for m in index["manifests"]} - {m["digest"] for m in kept}
            users = [label for digest in sorted(digests) for label in self.holders(digest)]
            if users:
                raise StoreError(f"image {reference} is used by container {', '.join(users)}; "
                                 f"remove the container first (kura rm)")
            index["manifests"] = kept
            self._write_index(index)
            needed = set()
            for entry in kept:
                needed |= self.reachable(Digest.parse(entry["digest"]))
            self.clean_partials()
            removed = []
            for algorithm_dir in (self.root / "blobs").iterdir():
                for path in algorithm_dir.iterdir():
                    digest = Digest.parse(f"{algorithm_dir.name}:{path.name}")
                    if digest not in needed:
                        path.unlink()
                        removed.append(digest)
            return removed

    # -- images in use (by containers): `remove` refuses to drop the last reference to one ----
    def hold(self, holder: str, digest: str, label: str) -> None:
        """Record that `holder` (a container id) uses the stored image `digest`; `label` is how
        a refusal names it. Refused when no reference names that image any more."""
        if not holder.isalnum():
            raise StoreError(f"invalid holder {holder!r}")
        with self.locked():
            if not any(m.get("digest") == digest for m in self._read_index()["manifests"]):
                raise StoreError(f"image {digest} is no longer in the store")
            holds = self.scratch / "holds"
            holds.mkdir(exist_ok=True)
            _write_atomic(holds / holder, json.dumps({"digest": digest, "label": label}).encode(), self.scratch)

    def release(self, holder: str) -> None:
        if holder.isalnum():
            (self.scratch / "holds" / holder).unlink(missing_ok=True)

    def holders(self, digest: str) -> list[str]:
        """The labels of the holders of image `digest`."""
        holds = self.scratch / "holds"
        labels = []
        for path in sorted(holds.iterdir()) if holds.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("digest") == digest:
                labels.append(str(record.get("label")))
        return labels

    # -- where blobs were seen (for cross-repository mounts when pushing) ---------------
    SOURCES_PER_BLOB = 8

    def record_sources(self, digests: list[str], host: str, repository: str) -> None:
        """Remember that these blobs exist in `host/repository`."""
        with self.locked():
            sources = self._read_sources()
            for digest in digests:
                seen = [s for s in sources.get(digest, []) if s != [host, repository]]
                sources[digest] = ([[host, repository]] + seen)[: self.SOURCES_PER_BLOB]
            _write_atomic(self.scratch / "sources.json", json.dumps(sources).encode(), self.scratch)

    def sources(self, digest: str, host: str) -> list[str]:
        """Repositories of `host` known to hold the blob, most recent first."""
        return [repo for h, repo in self._read_sources().get(digest, []) if h == host]

    def _read_sources(self) -> dict:
        return self._read_json("sources.json")

    # -- unfinished upload sessions (so that a re-run push continues them) ---------------
    def upload_session(self, host: str, repository: str, digest: str) -> str | None:
        """The Location of the upload session a push left for this blob, if any."""
        entry = self._read_json("uploads.json").get(_session_key(host, repository, digest))
        return entry.get("location") if isinstance(entry, dict) else None

    @contextlib.contextmanager
    def upload_claim(self, host: str, repository: str, digest: str):
        """True while this process alone owns the upload session of this blob (an exclusive
        flock, released and its file removed on exit); False when another push owns it."""
        key = hashlib.sha256(_session_key(host, repository, digest).encode()).hexdigest()
        path = self.scratch / "uploads" / key
        path.parent.mkdir(exist_ok=True)
        with _locked_file(path) as file:
            try:
                yield file is not None
            finally:
                if file is not None:
                    path.unlink(missing_ok=True)

    def remember_upload_session(self, host: str, repository: str, digest: str, location: str | None) -> None:
        """Record (or, with None, forget) where the upload of a blob stands."""
        key = _session_key(host, repository, digest)
        with self.locked():
            sessions = self._read_json("uploads.json")
            cutoff = time.time() - PARTIAL_MAX_AGE
            sessions = {k: v for k, v in sessions.items() if isinstance(v, dict) and v.get("time", 0) > cutoff}
            if location is None:
                if sessions.pop(key, None) is None:
                    return
            else:
                sessions[key] = {"location": location, "time": time.time()}
            _write_atomic(self.scratch / "uploads.json", json.dumps(sessions).encode(), self.scratch)

    def _read_json(self, name: str) -> dict:
        try:
            data = json.loads((self.scratch / name).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def reachable(self, digest: Digest) -> set[Digest]:
        """A manifest or index and everything it references that is in the store."""
        found = {digest}
        try:
            document = json.loads(self.read_blob(digest))
        except (FileNotFoundError, ValueError):
            return found
        for child in document.get("manifests", []):
            found |= self.reachable(Digest.parse(child["digest"]))
        for descriptor in ([document["config"]] if "config" in document else []) + document.get("layers", []):
            found.add(Digest.parse(descriptor["digest"]))
        return found


def _session_key(host: str, repository: str, digest: str) -> str:
    return f"{host}/{repository}@{digest}"


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked_file(path: Path, create: bool = True):
    """`path` opened read-write under an exclusive flock, or None when another process holds
    it (or it is gone, with create=False). The flock is on the file itself, so its holder may
    rename or remove it: a process that was waiting then finds another file (or none) at the
    path, and says None rather than hold a lock on a file that is no longer the one."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            yield None
            return
        with os.fdopen(fd, "r+b", closefd=False) as file:
            yield file
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(path: Path, mode: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, scratch: Path) -> None:
    tmp = scratch / f"{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
