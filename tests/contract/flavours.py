"""The storage drivers the contract suite (tests/contract/) runs against.

Adding a driver is one entry in FLAVOURS at the end of this file: a Flavour that opens a fresh,
empty store, or a second driver over the store of one it opened (as another process serving
that store would have). Every test in tests/contract/ then runs once per flavour, with the
flavour's name in its id (`test_x[filesystem]`, `test_x[s3]`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from storage import FilesystemDriver, StorageDriver, filesystem


class Flavour:
    fixtures: tuple[str, ...] = ()
    """Names of pytest fixtures the flavour needs (say, a running S3 server); the values are
    passed to __init__ as keyword arguments."""

    marks: tuple = ()
    """pytest marks for every test run on this flavour (e2e when it needs a real server)."""

    clock_step: float = 0.05
    """Seconds to wait so that two writes get timestamps that differ, and a time.time() taken
    before a write is not later than the stamp the store gives it (a filesystem stamps with a
    coarse clock; S3's Last-Modified has whole seconds)."""

    def __init__(self, tmp_path: Path, **fixtures):
        self.tmp_path = tmp_path

    async def open(self, shared_with: StorageDriver | None = None) -> StorageDriver:
        """A driver over a new, empty store; or, with `shared_with` (a driver this flavour
        opened), another driver over that one's store."""
        raise NotImplementedError

    def shorten_lock_waits(self, monkeypatch, seconds: float) -> None:
        """Make the driver give up waiting for a lock (repository lock, reference guard,
        upload session) after `seconds`, so that RepositoryBusy is tested quickly."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """After the test, once every driver it opened is closed."""


class FilesystemFlavour(Flavour):
    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path)
        self.stores = 0

    async def open(self, shared_with: StorageDriver | None = None) -> StorageDriver:
        if shared_with is not None:
            return FilesystemDriver(shared_with.root)
        self.stores += 1
        return FilesystemDriver(self.tmp_path / f"store-{self.stores}")

    def shorten_lock_waits(self, monkeypatch, seconds: float) -> None:
        monkeypatch.setattr(filesystem, "LOCK_WAIT_SECONDS", seconds)


class S3Flavour(Flavour):
    """A fresh prefix in the test module's bucket on a real S3 server (SeaweedFS)."""
    fixtures = ("s3_bucket",)
    marks = (pytest.mark.e2e,)
    clock_step = 1.1  # LastModified has whole seconds

    def __init__(self, tmp_path: Path, s3_bucket):
        super().__init__(tmp_path)
        self.bucket = s3_bucket

    async def open(self, shared_with: StorageDriver | None = None) -> StorageDriver:
        from storage.s3 import S3Driver
        from storage.s3_objects import S3Location

        if shared_with is not None:
            return S3Driver(shared_with.location, guard_settle_seconds=0.3)
        b = self.bucket
        driver = S3Driver(S3Location(b.endpoint, b.region, b.bucket, f"t-{uuid.uuid4().hex[:10]}",
                                     b.access_key, b.secret_key), guard_settle_seconds=0.3)
        await driver.open()
        return driver

    def shorten_lock_waits(self, monkeypatch, seconds: float) -> None:
        from storage import s3
        monkeypatch.setattr(s3, "LOCK_WAIT_SECONDS", seconds)


FLAVOURS: dict[str, type[Flavour]] = {
    "filesystem": FilesystemFlavour,
    "s3": S3Flavour,
}
