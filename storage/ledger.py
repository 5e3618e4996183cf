"""The filesystem driver's usage ledgers (see driver.UsageLedger and layout.py).

A ledger is a cache: its files are written without fsync (a crash at worst leaves it stale,
and every start-up recounts it), but always by rename, and only under the ledger's flock,
so that several processes serving one store keep one exact count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from ocispec.digest import Digest, InvalidDigest

from .driver import UsageLedger
from .errors import QuotaExceeded, RepositoryBusy


class FilesystemLedger(UsageLedger):
    def __init__(self, directory: Path, tmp: Path, flock: Callable[[int], Awaitable[bool]]):
        self.directory = directory
        self.tmp = tmp
        self._flock = flock

    @contextlib.asynccontextmanager
    async def _locked(self):
        await asyncio.to_thread(os.makedirs, self.directory / "blobs", exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not await self._flock(fd):
                raise RepositoryBusy("usage ledger")
            yield
        finally:
            os.close(fd)

    async def _run(self, func, *args):
        async with self._locked():
            return await asyncio.to_thread(func, *args)

    async def charge(self, digest: Digest, size: int, limit: int) -> int | None:
        return await self._run(self._charge, digest, size, limit)

    async def refund(self, digest: Digest, token: int) -> None:
        await self._run(self._refund, digest, token)

    async def confirm(self, digest: Digest, size: int) -> None:
        await self._run(self._confirm, digest, size)

    async def total(self) -> int | None:
        state = await asyncio.to_thread(self._read_state)
        return None if state is None else state[0]

    async def checkpoint(self) -> int:
        state = await self._run(self._read_state)
        return 0 if state is None else state[1]

    async def replace(self, counted: dict[Digest, int], checkpoint: int) -> int:
        return await self._run(self._replace, counted, checkpoint)

    # -- under the lock, in a thread ----------------------------------------------------
    def _charge(self, digest: Digest, size: int, limit: int) -> int | None:
        if self._read_marker(digest) is not None:
            return None
        total, seq = self._read_state() or (0, 0)
        if total + size > limit:
            raise QuotaExceeded(total, limit, size)
        seq += 1
        self._write_marker(digest, size, seq)
        self._write_state(total + size, seq)
        return seq

    def _refund(self, digest: Digest, token: int) -> None:
        marker = self._read_marker(digest)
        if marker is None or marker[1] != token:
            return
        total, seq = self._read_state() or (0, 0)
        self._marker(digest).unlink(missing_ok=True)
        self._write_state(max(total - marker[0], 0), seq)

    def _confirm(self, digest: Digest, size: int) -> None:
        total, seq = self._read_state() or (0, 0)
        seq += 1
        marker = self._read_marker(digest)
        total += size - (marker[0] if marker is not None else 0)
        self._write_marker(digest, size, seq)
        self._write_state(total, seq)

    def _replace(self, counted: dict[Digest, int], checkpoint: int) -> int:
        _, seq = self._read_state() or (0, 0)
        total = 0
        seen = set()
        for digest, path in self._markers():
            marker = _parse_marker(path)
            if digest in counted:
                seen.add(digest)
                total += counted[digest]
                if marker is None or marker[0] != counted[digest]:
                    self._write_marker(digest, counted[digest], seq)
            elif marker is not None and marker[1] > checkpoint:
                total += marker[0]  # charged while the walk ran: it may have missed it
            else:
                path.unlink(missing_ok=True)
        for digest, size in counted.items():
            if digest not in seen:
                self._write_marker(digest, size, seq)
                total += size
        self._write_state(total, seq)
        return total

    # -- files ------------------------------------------------------------------------
    def _marker(self, digest: Digest) -> Path:
        Digest.parse(str(digest))  # no `/` or `..` smuggled in by a hand-built Digest
        return self.directory / "blobs" / digest.algorithm / digest.encoded

    def _markers(self):
        blobs = self.directory / "blobs"
        for algorithm in sorted(os.listdir(blobs)):
            for entry in os.scandir(blobs / algorithm):
                try:
                    yield Digest.parse(f"{algorithm}:{entry.name}"), Path(entry.path)
                except InvalidDigest:
                    os.unlink(entry.path)

    def _read_marker(self, digest: Digest) -> tuple[int, int] | None:
        return _parse_marker(self._marker(digest))

    def _write_marker(self, digest: Digest, size: int, seq: int) -> None:
        path = self._marker(digest)
        path.parent.mkdir(exist_ok=True)
        self._write(path, f"{size} {seq}".encode())

    def _read_state(self) -> tuple[int, int] | None:
        try:
            state = json.loads((self.directory / "state").read_bytes())
            return int(state["bytes"]), int(state["seq"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # torn by a crash: the next recount rewrites it

    def _write_state(self, total: int, seq: int) -> None:
        self._write(self.directory / "state", json.dumps({"bytes": total, "seq": seq}).encode())

    def _write(self, path: Path, data: bytes) -> None:
        tmp = self.tmp / f"{uuid.uuid4().hex}.usage"
        tmp.write_bytes(data)
        os.replace(tmp, path)


def _parse_marker(path: Path) -> tuple[int, int] | None:
    try:
        size, seq = path.read_text().split()
        return int(size), int(seq)
    except FileNotFoundError:
        return None
    except ValueError:
        return None
