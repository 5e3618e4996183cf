"""`make bench-gc`: what a garbage collection costs on a store of 10,000 manifests and
50,000 blobs, and what it does to a running `kura serve`.

The store is written straight into the filesystem layout (tiny blobs): 100 repositories of
100 tagged images, each a manifest, its own config, three layers of its own and one of 100
shared base layers. A tenth of the images is then deleted (revision link and tag removed)
and everything is aged past the grace period, so a collection has ~5,000 blobs to delete.

1. `kura gc` as its own process, while a probe keeps sending GET /v2/ and manifest GETs to a
   `kura serve` on the same store: duration, the collector's peak RSS, probe latency
   (max, p99) before and during.
2. The same again with the collection inside `kura serve` (gc.interval_seconds = 1): the
   server's latency while it collects, and its peak RSS.
Numbers only: nothing here asserts a speed. Every probe request must succeed."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from ocispec.digest import Digest
from storage.layout import Layout
from tests.support.paths import REPO
from tests.support.servers import start_kura, stop

MANIFESTS = int(os.environ.get("KURA_BENCH_GC_MANIFESTS", "10000"))
REPOSITORIES = 100
SHARED = 100
OWN_LAYERS = 3
DELETED_FRACTION = 0.1
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def put_blob(layout: Layout, data: bytes) -> Digest:
    digest = Digest.of_bytes(data)
    write(layout.blob(digest), data)
    return digest


def generate(root: Path) -> list[tuple[str, str, str]]:
    """The store; returns (repository, tag, manifest digest) of every image."""
    layout = Layout(root)
    for directory in (layout.blobs, layout.repositories, layout.uploads, layout.tmp):
        directory.mkdir(parents=True, exist_ok=True)
    shared = [put_blob(layout, b"shared base layer %d" % n) for n in range(SHARED)]
    images = []
    for n in range(MANIFESTS):
        repository = f"bench/r{n % REPOSITORIES:03d}"
        config = put_blob(layout, b'{"image": %d}' % n)
        layers = [put_blob(layout, b"layer %d of image %d" % (k, n)) for k in range(OWN_LAYERS)]
        layers.append(shared[n % SHARED])
        document = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(config), "size": 20},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(d), "size": 30}
                       for d in layers]}).encode()
        manifest = put_blob(layout, document)
        for digest in (config, *layers):
            write(layout.layer_link(repository, digest), str(digest).encode())
        write(layout.revision_link(repository, manifest),
              json.dumps({"digest": str(manifest), "mediaType": OCI_MANIFEST}).encode())
        tag = f"t{n}"
        write(layout.tag(repository, tag), str(manifest).encode())
        images.append((repository, tag, str(manifest)))
    return images


def delete_some(root: Path, images: list, rng: random.Random) -> list:
    """Delete a tenth of the images as a client would (revision link and tag); the rest."""
    layout = Layout(root)
    doomed = set(rng.sample(range(len(images)), int(len(images) * DELETED_FRACTION)))
    for n in doomed:
        repository, tag, digest = images[n]
        layout.tag(repository, tag).unlink()
        layout.revision_link(repository, Digest.parse(digest)).unlink()
    return [image for n, image in enumerate(images) if n not in doomed]


def age(root: Path, seconds: float = 7200) -> None:
    stamp = time.time() - seconds
    for top in ("blobs", "repositories"):
        for current, _, files in os.walk(root / top):
            for name in files:
                os.utime(os.path.join(current, name), (stamp, stamp))


def count_blobs(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root / "blobs"))


class Probe:
    """GET /v2/ and a random image's manifest, one after the other, as fast as answered."""

    def __init__(self, base: str, images: list):
        self.base = base
        self.images = images
        self.samples: list[tuple[float, float]] = []  # (when, seconds)
        self.failures = 0
        self.running = True

    async def run(self) -> None:
        rng = random.Random(1)
        async with aiohttp.ClientSession() as session:
            while self.running:
                repository, tag, _ = rng.choice(self.images)
                for path in ("/v2/", f"/v2/{repository}/manifests/{tag}"):
                    started = time.perf_counter()
                    try:
                        async with session.get(self.base + path, headers={"Accept": OCI_MANIFEST}) as r:
                            await r.read()
                            ok = r.status == 200
                    except aiohttp.ClientError:
                        ok = False
                    self.samples.append((time.monotonic(), time.perf_counter() - started))
                    self.failures += not ok
                await asyncio.sleep(0.002)

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for when, seconds in self.samples if start <= when <= end]


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "no requests"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{len(ordered)} requests, median {statistics.median(ordered) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def cli_collection(root: Path, config: Path, base: str, images: list, work: Path) -> None:
    probe = Probe(base, images)
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(5)
    baseline_end = time.monotonic()
    report_file = work / "gc-peak-rss"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.peak_rss", str(report_file), sys.executable, "-m", "kura", "gc",
        "--config", str(config), "--json", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    started = time.monotonic()
    out, err = await process.communicate()
    ended = time.monotonic()
    await asyncio.sleep(1)
    probe.running = False
    await task
    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    print(f"kura gc (own process): {ended - started:.1f} s wall ({report['duration_seconds']:.1f} s collecting), "
          f"peak RSS {int(report_file.read_text()) / 2**20:.0f} MiB; deleted {len(report['blobs'])} blobs "
          f"({report['bytes_freed']} bytes) and {len(report['layer_links'])} blob links")
    print(f"  serving before:  {summary(probe.between(0, baseline_end))}")
    print(f"  serving during:  {summary(probe.between(started, ended))}")
    assert probe.failures == 0, f"{probe.failures} probe requests failed"


async def server_collection(base: str, pid: int, images: list, log: Path) -> None:
    probe = Probe(base, images)
    rss_before = vm_rss(pid)
    hwm_before = vm_hwm(pid)
    started = time.monotonic()
    task = asyncio.create_task(probe.run())
    deadline = started + 600
    while time.monotonic() < deadline and len(re.findall("garbage collection freed", log.read_text())) < 2:
        await asyncio.sleep(0.2)
    ended = time.monotonic()
    probe.running = False
    await task
    lines = re.findall(r"garbage collection freed (\d+) bytes: (\d+) blob.*in ([\d.]+) s", log.read_text())
    for freed, blobs, seconds in lines[:2]:
        print(f"kura serve collection: {seconds} s, deleted {blobs} blobs ({freed} bytes)")
    print(f"  server RSS {rss_before / 2**20:.0f} MiB before, peak {vm_hwm(pid) / 2**20:.0f} MiB "
          f"(peak before: {hwm_before / 2**20:.0f} MiB)")
    print(f"  serving during:  {summary(probe.between(started, ended))}")
    assert probe.failures == 0, f"{probe.failures} probe requests failed"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="kura-bench-gc-"))
    rng = random.Random(20261201)
    try:
        root = work / "store"
        started = time.monotonic()
        images = generate(root)
        kept = delete_some(root, images, rng)
        age(root)
        print(f"store: {len(images)} manifests, {count_blobs(root)} blobs, {len(images) - len(kept)} images "
              f"deleted (written in {time.monotonic() - started:.0f} s)")

        config = work / "kura.toml"
        config.write_text(f'[storage]\nroot = "{root}"\n[gc]\ninterval_seconds = 0\n[log]\naccess_log = false\n')
        server = start_kura(root, None, "--config", str(config), log=work / "serve.log")
        try:
            asyncio.run(cli_collection(root, config, server.url, kept, work))
        finally:
            stop(server)
        print(f"  blobs left: {count_blobs(root)}")

        kept = delete_some(root, kept, rng)
        age(root)
        config.write_text(f'[storage]\nroot = "{root}"\n[gc]\ninterval_seconds = 1\n[log]\naccess_log = false\n')
        log = work / "serve-gc.log"
        (root / "gc" / "last").unlink(missing_ok=True)
        server = start_kura(root, None, "--config", str(config), log=log)
        try:
            asyncio.run(server_collection(server.url, server.process.pid, kept, log))
        finally:
            stop(server)
        print(f"  blobs left: {count_blobs(root)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
