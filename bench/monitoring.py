"""What monitoring costs: the latency of `/metrics`, `/healthz` and `/readyz` themselves, and
what counting every request does to manifest GETs (metrics on against off).

    python -m bench.monitoring [--requests 400] [--seconds 5] [--rounds 3]

For 1 and 2 workers: starts `kura serve` (access log off) on a fresh store with metrics on,
pushes one image, sends traffic (wrk, c=32) to its manifest so that every series exists, then
asks each monitoring endpoint `--requests` times, one request at a time, and prints p50/p99 in
milliseconds as the client sees them and the server's CPU time per request. Then manifest GETs
per second (wrk, c=32) with metrics on and off, alternated over `--rounds` rounds (median)."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import tempfile
from pathlib import Path

from bench.load import wrk
from bench.servers import start_kura
from bench.ui_pages import cpu_seconds, percentile, seed, timed

MANIFEST_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
MANIFEST = "/v2/bench/app/manifests/tag-0000"


def endpoint_costs(host: str, requests: int, pids: list[int]) -> list[tuple[str, float, float, float, int]]:
    """Per endpoint: p50 ms, p99 ms, server CPU ms per request, body bytes."""
    rows = []
    connection = http.client.HTTPConnection(host, timeout=30)
    try:
        for path in ("/metrics", "/healthz", "/readyz"):
            connection.request("GET", path)
            size = len(connection.getresponse().read())
            cpu = cpu_seconds(pids)
            samples = [timed(connection, path) for _ in range(requests)]
            cpu = (cpu_seconds(pids) - cpu) / requests * 1000
            rows.append((path, statistics.median(samples), percentile(samples, 0.99), cpu, size))
    finally:
        connection.close()
    return rows


def manifest_gets(tmp: Path, workers: int, metrics: bool, seconds: float) -> float:
    server = start_kura(tmp / f"gets-{workers}-{metrics}", workers=workers,
                        extra_config=f"[metrics]\nenabled = {'true' if metrics else 'false'}\n")
    try:
        asyncio.run(seed(f"http://{server.host}", 1))
        wrk(f"http://{server.host}{MANIFEST}", 1, headers=MANIFEST_ACCEPT)  # warm-up
        return wrk(f"http://{server.host}{MANIFEST}", seconds, headers=MANIFEST_ACCEPT).rate
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kura-monitoring-bench-") as name:
        tmp = Path(name)
        for workers in (1, 2):
            server = start_kura(tmp / f"endpoints-{workers}", workers=workers)
            try:
                asyncio.run(seed(f"http://{server.host}", 1))
                wrk(f"http://{server.host}{MANIFEST}", args.seconds, headers=MANIFEST_ACCEPT)
                rows = endpoint_costs(server.host, args.requests, server.processes())
            finally:
                server.stop()
            print(f"{workers} worker(s): {args.requests} requests each, c=1; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"  {'endpoint':<10} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8} {'bytes':>8}")
            for path, p50, p99, cpu, size in rows:
                print(f"  {path:<10} {p50:8.2f} {p99:8.2f} {cpu:8.2f} {size:8d}")
        for workers in (1, 2):
            rates: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for metrics in (True, False):
                    rates[metrics].append(manifest_gets(tmp, workers, metrics, args.seconds))
            on, off = statistics.median(rates[True]), statistics.median(rates[False])
            print(f"manifest GET, {workers} worker(s), wrk c=32, median of {args.rounds}: metrics on {on:,.0f} req/s, "
                  f"off {off:,.0f} req/s ({on / off:.2f}x); rounds on {[round(r) for r in rates[True]]}, "
                  f"off {[round(r) for r in rates[False]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
