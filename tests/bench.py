"""`make bench`: Kura against the reference registry (docker-registry), measured in one run.

Prints push/pull wall times with skopeo (the shared debian and redis images) and with a raw
256 MiB blob over HTTP, plus each server's peak RSS, and the Kura/reference ratio of each: on
the filesystem, and (unless KURA_BENCH_S3=0) on one SeaweedFS: Kura alone, three Kura instances
behind haproxy, and the reference with its s3 driver.
Numbers only: nothing here asserts a speed (this machine is noisy)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from tests.support.paths import IMAGES, require_shared
from tests.support.balancer import start_haproxy
from tests.support.instances import start_instances
from tests.support.kura_s3 import start_kura_s3, storage_toml
from tests.support.reference_s3 import start_reference_s3
from tests.support.seaweedfs import SeaweedFS
from tests.support.servers import Server, start_distribution, start_kura, stop, stop_distribution

REPEAT = int(os.environ.get("KURA_BENCH_REPEAT", "3"))
WITH_S3 = os.environ.get("KURA_BENCH_S3", "1") != "0"
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


def skopeo_round(server, work: Path, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    for image, tag in (("debian", "bookworm"), ("redis", "7")):
        skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{IMAGES / image}:{tag}",
               f"docker://{server.host}/bench{n}/{image}:{tag}")
    pushed = time.perf_counter()
    for image, tag in (("debian", "bookworm"), ("redis", "7")):
        skopeo("copy", "--src-tls-verify=false", f"docker://{server.host}/bench{n}/{image}:{tag}",
               f"oci:{work / f'pull{n}-{image}'}:{tag}")
    return pushed - start, time.perf_counter() - pushed


async def raw_round(server, n: int) -> tuple[float, float]:
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


@dataclass
class Running:
    """A registry under test: where clients reach it, its server processes, how to stop it."""
    host: str
    pids: list[int]
    stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def start_configuration(kind: str, root: Path, seaweedfs) -> Running:
    if kind == "kura":
        server = start_kura(root / "data")
        return Running(server.host, [server_pid(server)], lambda: stop(server))
    if kind == "reference":
        server = start_distribution(root)
        return Running(server.host, [server_pid(server)], lambda: stop_distribution(server))
    bucket = seaweedfs.new_bucket(f"bench-{kind}")
    if kind == "kura s3":
        server = start_kura_s3(bucket, root)
        return Running(server.host, [server_pid(server)], lambda: stop(server))
    if kind == "reference s3":
        server = start_reference_s3(root, bucket)
        return Running(server.host, [server_pid(server)], lambda: stop(server))
    if kind == "kura s3 x3":
        group = start_instances(root, storage_toml(bucket, root=root / "local"), count=3)
        try:
            balancer = start_haproxy(root / "haproxy", group.ports)
        except BaseException:
            group.stop_all()
            raise

        def stop_both() -> None:
            balancer.stop()
            group.stop_all()

        return Running(balancer.host, [instance.process.pid for instance in group], stop_both)
    raise ValueError(kind)


def measure(kind: str, work: Path, seaweedfs) -> dict[str, float]:
    results: dict[str, list[float]] = {k: [] for k in ("skopeo push", "skopeo pull", "raw push", "raw pull")}
    rss = []
    for n in range(REPEAT):
        root = work / f"{kind.replace(' ', '-')}-{n}"
        running = start_configuration(kind, root, seaweedfs)
        try:
            push, pull = skopeo_round(running, root, n)
            results["skopeo push"].append(push)
            results["skopeo pull"].append(pull)
            push, pull = asyncio.run(raw_round(running, n))
            results["raw push"].append(push)
            results["raw pull"].append(pull)
            rss.append(max(peak_rss(pid) for pid in running.pids))
        finally:
            running.stop()
            shutil.rmtree(root, ignore_errors=True)
    summary = {k: statistics.median(v) for k, v in results.items()}
    summary["peak RSS MiB"] = max(rss) / MIB
    return summary


def main() -> None:
    require_shared()
    kinds = ["kura", "reference"] + (["kura s3", "kura s3 x3", "reference s3"] if WITH_S3 else [])
    with tempfile.TemporaryDirectory(prefix="kura-bench-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            seaweedfs = stack.enter_context(SeaweedFS(work / "seaweedfs")) if WITH_S3 else None
            results = {kind: measure(kind, work, seaweedfs) for kind in kinds}
    print(f"median of {REPEAT} runs; skopeo = debian + redis images; raw = one {RAW_SIZE // MIB} MiB blob; "
          "s3 = SeaweedFS on loopback; x3 = three instances behind haproxy (RSS: the largest one)")
    ratios = [("kura", "reference")] + ([("kura s3", "reference s3"), ("kura s3 x3", "reference s3")] if WITH_S3 else [])
    header = "".join(f"{kind:>14}" for kind in kinds) + "".join(f"{a + '/' + b.split()[0][:3]:>16}" for a, b in ratios)
    print(f"{'':14}{header}")
    for key in results["kura"]:
        unit = "" if "RSS" in key else " s"
        row = "".join(f"{results[kind][key]:>12.2f}{unit:2}" for kind in kinds)
        row += "".join(f"{results[a][key] / results[b][key]:>15.2f}x" for a, b in ratios)
        print(f"{key:14}{row}")


if __name__ == "__main__":
    main()
