"""`make bench`: Kura against the reference registry (docker-registry), measured in one run.

Prints push/pull wall times with skopeo (the shared debian and redis images) and with a raw
256 MiB blob over HTTP, plus each server's peak RSS, and the Kura/reference ratio of each.
Numbers only: nothing here asserts a speed (this machine is noisy)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.paths import IMAGES, require_shared
from tests.support.servers import Server, start_distribution, start_kura, stop, stop_distribution

REPEAT = int(os.environ.get("KURA_BENCH_REPEAT", "3"))
RAW_SIZE = 256 << 20
MIB = 1 << 20


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def server_pid(server: Server) -> int:
    if server.process is not None:
        return server.process.pid
    return int((server.extra["workdir"] / "registry.pid").read_text())


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)


def skopeo_round(server: Server, work: Path, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    for image, tag in (("debian", "bookworm"), ("redis", "7")):
        skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{IMAGES / image}:{tag}",
               f"docker://{server.host}/bench{n}/{image}:{tag}")
    pushed = time.perf_counter()
    for image, tag in (("debian", "bookworm"), ("redis", "7")):
        skopeo("copy", "--src-tls-verify=false", f"docker://{server.host}/bench{n}/{image}:{tag}",
               f"oci:{work / f'pull{n}-{image}'}:{tag}")
    return pushed - start, time.perf_counter() - pushed


async def raw_round(server: Server, n: int) -> tuple[float, float]:
    block = os.urandom(MIB)
    hasher = hashlib.sha256()
    for _ in range(RAW_SIZE // MIB):
        hasher.update(block)
    digest = "sha256:" + hasher.hexdigest()

    async def body():
        for _ in range(RAW_SIZE // MIB):
            yield block

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        async with session.post(f"{server.url}/v2/raw{n}/blobs/uploads/") as r:
            location = r.headers["Location"]
        if location.startswith("/"):
            location = server.url + location
        async with session.patch(location, data=body()) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        if location.startswith("/"):
            location = server.url + location
        sep = "&" if "?" in location else "?"
        async with session.put(f"{location}{sep}digest={digest}") as r:
            assert r.status == 201, await r.text()
        pushed = time.perf_counter()
        received = 0
        async with session.get(f"{server.url}/v2/raw{n}/blobs/{digest}") as r:
            async for chunk in r.content.iter_chunked(MIB):
                received += len(chunk)
        assert received == RAW_SIZE
        return pushed - start, time.perf_counter() - pushed


def measure(kind: str, work: Path) -> dict[str, float]:
    results: dict[str, list[float]] = {k: [] for k in ("skopeo push", "skopeo pull", "raw push", "raw pull")}
    rss = []
    for n in range(REPEAT):
        root = work / f"{kind}-{n}"
        server = start_kura(root / "data") if kind == "kura" else start_distribution(root)
        try:
            push, pull = skopeo_round(server, root, n)
            results["skopeo push"].append(push)
            results["skopeo pull"].append(pull)
            push, pull = asyncio.run(raw_round(server, n))
            results["raw push"].append(push)
            results["raw pull"].append(pull)
            rss.append(peak_rss(server_pid(server)))
        finally:
            stop(server) if kind == "kura" else stop_distribution(server)
            shutil.rmtree(root, ignore_errors=True)
    summary = {k: statistics.median(v) for k, v in results.items()}
    summary["peak RSS MiB"] = max(rss) / MIB
    return summary


def main() -> None:
    require_shared()
    with tempfile.TemporaryDirectory(prefix="kura-bench-") as tmp:
        work = Path(tmp)
        kura = measure("kura", work)
        reference = measure("distribution", work)
    print(f"median of {REPEAT} runs; skopeo = debian + redis images; raw = one {RAW_SIZE // MIB} MiB blob")
    print(f"{'':14} {'kura':>10} {'reference':>10} {'kura/ref':>9}")
    for key in kura:
        unit = "" if "RSS" in key else " s"
        print(f"{key:14} {kura[key]:>8.2f}{unit:2} {reference[key]:>8.2f}{unit:2} {kura[key] / reference[key]:>8.2f}x")


if __name__ == "__main__":
    main()
