"""Uploading and downloading a 1 GiB blob must raise the server's RSS by less than 50 MiB."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp

from tests.support.servers import start_kura, stop

GIB = 1 << 30
MIB = 1 << 20
LIMIT = 50 * MIB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakSampler:
    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._task = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()
        self.peak = max(self.peak, rss(self.pid))


def blob_source(size: int, block: bytes):
    hasher = hashlib.sha256()
    for _ in range(size // len(block)):
        hasher.update(block)
    return "sha256:" + hasher.hexdigest()


async def body(size: int, block: bytes):
    for _ in range(size // len(block)):
        yield block


async def transfer(base: str, pid: int, size: int) -> tuple[int, int, int]:
    block = os.urandom(MIB)
    digest = blob_source(size, block)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        # Warm up every code path once with a small blob, then take the baseline.
        small = os.urandom(100_000)
        small_digest = "sha256:" + hashlib.sha256(small).hexdigest()
        async with session.post(f"{base}/v2/mem/blobs/uploads/?digest={small_digest}", data=small) as r:
            assert r.status == 201
        async with session.get(f"{base}/v2/mem/blobs/{small_digest}") as r:
            assert await r.read() == small
        baseline = rss(pid)

        with PeakSampler(pid) as upload_peak:
            async with session.post(f"{base}/v2/mem/blobs/uploads/") as r:
                location = r.headers["Location"]
            async with session.patch(base + location, data=body(size, block)) as r:
                assert r.status == 202, await r.text()
            async with session.put(f"{base}{location}?digest={digest}") as r:
                assert r.status == 201, await r.text()

        with PeakSampler(pid) as download_peak:
            hasher = hashlib.sha256()
            received = 0
            async with session.get(f"{base}/v2/mem/blobs/{digest}") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(MIB):
                    hasher.update(chunk)
                    received += len(chunk)
            assert received == size
            assert "sha256:" + hasher.hexdigest() == digest
    return baseline, upload_peak.peak, download_peak.peak


def test_one_gib_blob_in_bounded_memory(tmp_path):
    server = start_kura(tmp_path / "store")
    try:
        baseline, upload_peak, download_peak = asyncio.run(transfer(server.url, server.process.pid, GIB))
    finally:
        stop(server)
    print(f"server RSS: baseline {baseline / MIB:.1f} MiB, upload peak +{(upload_peak - baseline) / MIB:.1f} MiB, "
          f"download peak +{(download_peak - baseline) / MIB:.1f} MiB")
    assert upload_peak - baseline < LIMIT
    assert download_peak - baseline < LIMIT
