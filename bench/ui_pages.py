"""How fast the web UI's pages answer for a repository with many tags.

    python -m bench.ui_pages [--tags 1000] [--requests 400] [--workers 1]

Starts `kura serve` (auth off, access log off) on a fresh store, pushes `--tags` distinct images
(one shared layer, a config each) through the API, each under its own tag, then asks for each
page `--requests` times, one request at a time, and prints the latency of the first (cold)
request and p50/p99 of the others, in milliseconds, as seen by the client, and the server's CPU
time per request."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.servers import start_kura

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REPOSITORY = "bench/app"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def seed(url: str, tags: int, concurrency: int = 16) -> None:
    layer = bytes(range(256)) * 64
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v2/{REPOSITORY}/blobs/uploads/?digest={_digest(layer)}", data=layer) as r:
            assert r.status == 201, await r.text()
        queue = list(range(tags))

        async def worker() -> None:
            while queue:
                number = queue.pop()
                config = json.dumps({"os": "linux", "architecture": "amd64", "created": "2026-01-01T00:00:00Z",
                                     "config": {"Cmd": ["app", str(number)], "Env": [f"BUILD={number}"],
                                                "Labels": {"org.example.build": str(number)}},
                                     "history": [{"created_by": f"build {number}"}],
                                     "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]}}).encode()
                async with session.post(f"{url}/v2/{REPOSITORY}/blobs/uploads/?digest={_digest(config)}",
                                        data=config) as r:
                    assert r.status == 201, await r.text()
                manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                       "config": {"mediaType": OCI_CONFIG, "digest": _digest(config),
                                                  "size": len(config)},
                                       "layers": [{"mediaType": OCI_LAYER, "digest": _digest(layer),
                                                   "size": len(layer)}]}).encode()
                async with session.put(f"{url}/v2/{REPOSITORY}/manifests/tag-{number:04d}", data=manifest,
                                       headers={"Content-Type": OCI_MANIFEST}) as r:
                    assert r.status == 201, await r.text()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def timed(connection: http.client.HTTPConnection, path: str) -> float:
    """One GET on a kept-alive connection: milliseconds until the whole body has arrived."""
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body[:200])
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the server's processes have used."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def measure(host: str, tags: int, requests: int, pids: list[int]) -> list[tuple[str, float, float, float, float]]:
    """Per page: cold ms, p50 ms, p99 ms, and the server's CPU ms per request (which a busy
    machine's other processes do not inflate, as they do the latencies)."""
    pages = [("repository list", "/ui/"),
             ("tags, page 1 (100 tags)", f"/ui/r/{REPOSITORY}"),
             ("tags, last page", f"/ui/r/{REPOSITORY}?page={max(1, (tags + 99) // 100)}"),
             ("image page by tag", f"/ui/r/{REPOSITORY}/-/m/tag-{tags // 2:04d}")]
    rows = []
    connection = http.client.HTTPConnection(host, timeout=30)
    try:
        for title, path in pages:
            cold = timed(connection, path)
            cpu = cpu_seconds(pids)
            samples = [timed(connection, path) for _ in range(requests)]
            cpu = (cpu_seconds(pids) - cpu) / requests * 1000
            rows.append((title, cold, statistics.median(samples), percentile(samples, 0.99), cpu))
    finally:
        connection.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui_pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kura-ui-bench-") as tmp:
        server = start_kura(Path(tmp), workers=args.workers)
        try:
            started = time.perf_counter()
            asyncio.run(seed(server.url, args.tags))
            print(f"seeded {args.tags} tags of distinct images in {time.perf_counter() - started:.1f} s")
            rows = measure(server.host, args.tags, args.requests, server.processes())
        finally:
            server.stop()
    load = os.getloadavg()[0]
    print(f"{'page':<26} {'cold ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8}   ({args.requests} requests each, "
          f"c=1, {args.workers} worker; load average {load:.1f} on {os.cpu_count()} CPUs)")
    for title, cold, p50, p99, cpu in rows:
        print(f"{title:<26} {cold:8.1f} {p50:8.1f} {p99:8.1f} {cpu:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
