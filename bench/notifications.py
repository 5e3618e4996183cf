"""What event notifications cost a request: latency with and without an endpoint.

    python -m bench.notifications [--requests 300] [--rounds 5]

Starts `kura serve --workers 1` on a fresh store three ways, alternated for `--rounds` rounds:
without notifications ("off"), with an endpoint that takes every event ("on": a receiver in
its own process, answering 200) and with one that is down ("down": events only queue). Each
run pushes `--requests` images one request at a time (a monolithic blob POST, a manifest PUT,
then a GET of that manifest), then GETs the manifests from 16 clients at once. Prints, per
measure, the median over rounds of each round's median latency in milliseconds (and the GETs
per second of the concurrent phase)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.servers import start_kura
from tests.support.servers import free_port, wait_until_up

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = b"{}"
CONCURRENCY = 16


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(layer: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(CONFIG),
                   "size": len(CONFIG)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _digest(layer),
                    "size": len(layer)}]}).encode()


async def one_run(url: str, requests: int, prefix: str) -> dict[str, float]:
    timings: dict[str, list[float]] = {"blob POST": [], "manifest PUT": [], "manifest GET": []}

    async def timed(name: str, method: str, path: str, **kwargs) -> None:
        started = time.perf_counter()
        async with session.request(method, url + path, **kwargs) as response:
            await response.read()
            assert response.status in (200, 201), (method, path, response.status)
        timings[name].append(time.perf_counter() - started)

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v2/b/blobs/uploads/?digest={_digest(CONFIG)}", data=CONFIG) as response:
            assert response.status == 201
        for n in range(requests):
            layer = f"{prefix}-{n}".encode()
            await timed("blob POST", "POST", f"/v2/b/blobs/uploads/?digest={_digest(layer)}", data=layer)
            await timed("manifest PUT", "PUT", f"/v2/b/manifests/{prefix}-{n}", data=_manifest(layer),
                        headers={"Content-Type": OCI_MANIFEST})
            await timed("manifest GET", "GET", f"/v2/b/manifests/{prefix}-{n}", headers={"Accept": OCI_MANIFEST})

        async def client(first: int) -> None:
            for n in range(first, requests, CONCURRENCY):
                async with session.get(f"{url}/v2/b/manifests/{prefix}-{n}", headers={"Accept": OCI_MANIFEST}) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))
        rate = requests / (time.perf_counter() - started)
    return {**{name: statistics.median(values) * 1000 for name, values in timings.items()},
            f"GET/s at c={CONCURRENCY}": rate}


def receive(port: int) -> None:
    """The endpoint: answers every POST 200."""
    async def taken(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", taken)
    app.router.add_get("/", taken)  # up?
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.notifications", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        return receive(args.receive)
    up, down = free_port(), free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.notifications", "--receive", str(up)])
    try:
        wait_until_up(f"http://127.0.0.1:{up}/", receiver)
        modes = {"off": "", "on": f'[[notifications]]\nurl = "http://127.0.0.1:{up}/events"\n',
                 "down": f'[[notifications]]\nurl = "http://127.0.0.1:{down}/events"\n'}
        results: dict[str, dict[str, list[float]]] = {mode: {} for mode in modes}
        with tempfile.TemporaryDirectory(prefix="kura-bench-notify-") as work:
            for round_ in range(args.rounds):
                for mode, extra in modes.items():
                    server = start_kura(Path(work) / f"{mode}-{round_}", workers=1, extra_config=extra)
                    try:
                        measured = asyncio.run(one_run(server.url, args.requests, f"r{round_}"))
                    finally:
                        server.stop()
                    for name, value in measured.items():
                        results[mode].setdefault(name, []).append(value)
    finally:
        receiver.terminate()
        receiver.wait()
    print(f"{'':22}" + "".join(f"{mode:>10}" for mode in modes))
    for name in results["off"]:
        print(f"{name:22}" + "".join(f"{statistics.median(results[mode][name]):10.2f}" for mode in modes))


if __name__ == "__main__":
    main()
