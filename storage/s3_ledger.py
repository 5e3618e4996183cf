"""The S3 driver's usage ledgers (see driver.UsageLedger): one object per ledger, changed
only by conditional writes (If-Match on the etag read), so several instances keep one exact
count without a lock: a writer that lost the race reads again and redoes its change."""

from __future__ import annotations

import asyncio
import json
import random

from ocispec.digest import Digest

from .driver import UsageLedger
from .errors import QuotaExceeded, RepositoryBusy
from .s3_objects import Bucket, Conflict

ATTEMPTS = 50


class S3Ledger(UsageLedger):
    def __init__(self, bucket: Bucket, key: str):
        self.bucket = bucket
        self.key = key

    async def _read(self) -> tuple[dict | None, str | None]:
        found = await self.bucket.get(self.key)
        if found is None:
            return None, None
        try:
            state = json.loads(found[0])
            state["bytes"], state["seq"], state["blobs"] = int(state["bytes"]), int(state["seq"]), dict(state["blobs"])
        except (ValueError, KeyError, TypeError):
            state = {"bytes": 0, "seq": 0, "blobs": {}, "torn": True}  # the next recount rewrites it
        return state, found[1]

    async def _update(self, change):
        """Apply `change(state)` (it edits the state in place and returns the result, or
        returns NO_WRITE with its result to leave the ledger as it is) until it sticks."""
        backoff = 0.005
        for _ in range(ATTEMPTS):
            state, etag = await self._read()
            fresh = state is None
            state = state or {"bytes": 0, "seq": 0, "blobs": {}}
            result = change(state)
            if isinstance(result, _NoWrite):
                return result.value
            state.pop("torn", None)
            data = json.dumps(state, separators=(",", ":")).encode()
            try:
                await self.bucket.put(self.key, data, create=fresh, if_match=None if fresh else etag)
                return result
            except Conflict:
                await asyncio.sleep(backoff * (0.5 + random.random()))  # many writers: spread them out
                backoff = min(backoff * 2, 0.5)
        raise RepositoryBusy("usage ledger")

    async def charge(self, digest: Digest, size: int, limit: int) -> int | None:
        def change(state):
            if str(digest) in state["blobs"]:
                return _NoWrite(None)
            if state["bytes"] + size > limit:
                raise QuotaExceeded(state["bytes"], limit, size)
            state["seq"] += 1
            state["blobs"][str(digest)] = [size, state["seq"]]
            state["bytes"] += size
            return state["seq"]
        return await self._update(change)

    async def refund(self, digest: Digest, token: int) -> None:
        def change(state):
            marker = state["blobs"].get(str(digest))
            if marker is None or marker[1] != token:
                return _NoWrite(None)
            del state["blobs"][str(digest)]
            state["bytes"] = max(state["bytes"] - marker[0], 0)
        await self._update(change)

    async def confirm(self, digest: Digest, size: int) -> None:
        def change(state):
            state["seq"] += 1
            marker = state["blobs"].get(str(digest))
            state["bytes"] += size - (marker[0] if marker is not None else 0)
            state["blobs"][str(digest)] = [size, state["seq"]]
        await self._update(change)

    async def total(self) -> int | None:
        state, _ = await self._read()
        return None if state is None or state.get("torn") else state["bytes"]

    async def checkpoint(self) -> int:
        state, _ = await self._read()
        return 0 if state is None else state["seq"]

    async def replace(self, counted: dict[Digest, int], checkpoint: int) -> int:
        def change(state):
            blobs = {}
            for digest, size in counted.items():
                marker = state["blobs"].get(str(digest))
                blobs[str(digest)] = marker if marker is not None and marker[0] == size else [size, state["seq"]]
            for digest, (size, seq) in state["blobs"].items():
                if digest not in blobs and seq > checkpoint:
                    blobs[digest] = [size, seq]  # charged while the walk ran: it may have missed it
            state["blobs"] = blobs
            state["bytes"] = sum(size for size, _ in blobs.values())
            return state["bytes"]
        return await self._update(change)


class _NoWrite:
    def __init__(self, value):
        self.value = value
