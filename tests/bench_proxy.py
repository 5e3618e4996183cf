"""`make bench-proxy`: the pull-through cache in front of the emulated Docker Hub
(tests/support/fake_hub.py), against pulling from that hub directly, in one run.

1. The largest layer of the shared redis image (~51 MB), fetched with aiohttp: time to first
   byte and total, from the hub directly (with its token), through a cold cache (a fresh
   `kura serve` store each round), the first hit right after that fill (the kernel is still
   writing the new blob back), and a warm hit.
2. `kura pull` of the shared redis image (linux/amd64, store only, a fresh client store each
   time), alternated: directly from the hub, through a cold cache, through the warm cache.
Numbers only: nothing here asserts a speed. `KURA_BENCH_PROXY_ROUNDS` (default 3)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.cli import kura
from tests.support.fake_hub import emulated_hub
from tests.support.servers import free_port, start_kura, stop

ROUNDS = int(os.environ.get("KURA_BENCH_PROXY_ROUNDS", "3"))


def cache_config(workdir: Path, hub_url: str) -> Path:
    path = workdir / "cache.toml"
    path.write_text(f'[log]\naccess_log = false\n\n[[proxy]]\nprefix = "docker.io"\nremote = "{hub_url}"\n')
    return path


async def start_cache(workdir: Path, hub_url: str, name: str):
    root = workdir / name
    return await asyncio.to_thread(start_kura, root, free_port(), "--config", str(cache_config(workdir, hub_url)))


async def largest_layer(session: aiohttp.ClientSession, hub) -> tuple[str, dict]:
    token = await hub_token(session, hub)
    async with session.get(f"{hub.registry_url}/v2/library/redis/manifests/{hub.seeded.redis_amd64}",
                           headers=token) as r:
        manifest = json.loads(await r.read())
    return max(manifest["layers"], key=lambda layer: layer["size"])["digest"], token


async def hub_token(session: aiohttp.ClientSession, hub) -> dict:
    params = {"service": "registry.docker.io", "scope": "repository:library/redis:pull"}
    async with session.get(hub.token_url, params=params) as r:
        return {"Authorization": f"Bearer {(await r.json())['token']}"}


async def fetch(session: aiohttp.ClientSession, url: str, headers: dict | None = None) -> tuple[float, float]:
    started = time.perf_counter()
    async with session.get(url, headers=headers or {}) as r:
        assert r.status == 200, r.status
        first = None
        async for _ in r.content.iter_chunked(1 << 20):
            if first is None:
                first = time.perf_counter() - started
        return first, time.perf_counter() - started


async def timed_pull(home: Path, reference: str) -> float:
    started = time.perf_counter()
    ran = await kura(home, "pull", "-q", reference, "--platform", "linux/amd64", timeout=300)
    assert ran.returncode == 0, ran.stderr
    return time.perf_counter() - started


def row(name: str, values: list[float]) -> str:
    return f"| {name} | {statistics.median(values) * 1000:.0f} ms | {min(values) * 1000:.0f}–{max(values) * 1000:.0f} ms |"


async def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kura-bench-proxy-"))
    results: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    async with emulated_hub(workdir / "hub", seed_cache=workdir / "seed") as hub:
        async with aiohttp.ClientSession() as session:
            digest, token = await largest_layer(session, hub)
            for number in range(ROUNDS):
                direct = await fetch(session, f"{hub.registry_url}/v2/library/redis/blobs/{digest}", token)
                cache = await start_cache(workdir, hub.registry_url, f"ttfb-{number}")
                try:
                    url = f"{cache.url}/v2/docker.io/library/redis/blobs/{digest}"
                    cold = await fetch(session, url)
                    first_hit = await fetch(session, url)
                    warm = await fetch(session, url)
                finally:
                    await asyncio.to_thread(stop, cache)
                for name, (first, total) in (("direct", direct), ("cold", cold),
                                             ("first hit right after the fill", first_hit), ("warm", warm)):
                    note(f"layer TTFB, {name}", first)
                    note(f"layer total, {name}", total)
        for number in range(ROUNDS):
            note("kura pull, direct from the hub",
                 await timed_pull(workdir / f"direct-{number}", f"{hub.registry_host}/library/redis:7"))
            cache = await start_cache(workdir, hub.registry_url, f"pull-{number}")
            try:
                reference = f"{cache.host}/docker.io/library/redis:7"
                note("kura pull, cold cache", await timed_pull(workdir / f"cold-{number}", reference))
                note("kura pull, warm cache", await timed_pull(workdir / f"warm-{number}", reference))
            finally:
                await asyncio.to_thread(stop, cache)
    print(f"\nPull-through cache vs the emulated Docker Hub, {ROUNDS} rounds (median, range):\n")
    print("| measurement | median | range |\n| --- | --- | --- |")
    for name, values in results.items():
        print(row(name, values))
    print(f"\n(work files in {workdir})", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
