"""Collections back to back while clients push and delete images with shared layers through
two `kura serve` processes on one store (which collect too). Afterwards every manifest a
client was told was stored is pullable byte for byte, fsck is clean, and the bytes of the
deleted images are gone.

The grace period is 0, so every blob not yet referenced is fair game at every moment: a
client whose blobs were collected before its manifest arrived gets MANIFEST_BLOB_UNKNOWN
and uploads them again (as it would after a longer wait with a real grace period). What
must never happen is a manifest accepted while a blob it names goes missing.

`pytest -s` prints the rounds, pushes and disk usage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.support.cli import run_kura
from tests.support.client import sha256
from tests.support.servers import start_kura, stop
from tests.test_crash_safety import fsck

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPOSITORIES = ("stress/a", "stress/b", "stress/c")
WORKERS = 4
SHARED_LAYERS = [hashlib.sha256(b"shared %d" % n).digest() * (64 * (n + 1)) for n in range(6)]  # 2-12 KiB


@dataclass
class Pushed:
    repository: str
    manifest: bytes
    blobs: dict[str, bytes]  # digest -> content

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


@dataclass
class Tally:
    acknowledged: dict[str, Pushed] = field(default_factory=dict)  # manifest digest -> push
    deleted: list[Pushed] = field(default_factory=list)
    pushes: int = 0
    refused_then_retried: int = 0
    mounts: int = 0
    collections: int = 0
    skipped_collections: int = 0
    peak_bytes: int = 0


class Worker:
    def __init__(self, number: int, bases: list[str], session: aiohttp.ClientSession, tally: Tally, seed: int):
        self.number = number
        self.bases = bases
        self.session = session
        self.tally = tally
        self.rng = random.Random(seed)
        self.mine: list[Pushed] = []
        self.where: dict[str, str] = {}  # blob digest -> a repository it was pushed to

    @property
    def base(self) -> str:
        return self.rng.choice(self.bases)

    async def run(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            await self.push_image()
            if self.mine and self.rng.random() < 0.4:
                await self.delete_image(self.mine.pop(self.rng.randrange(len(self.mine))))

    async def push_image(self) -> None:
        repository = self.rng.choice(REPOSITORIES)
        config = json.dumps({"worker": self.number, "n": self.rng.random()}).encode()
        layers = self.rng.sample(SHARED_LAYERS, self.rng.randint(1, 3)) + [self.rng.randbytes(self.rng.randint(1, 40_000))]
        blobs = {sha256(b): b for b in [config, *layers]}
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                        "size": len(layer)} for layer in layers]}).encode()
        tag = f"w{self.number}-{self.rng.randrange(1 << 30)}"
        skip_present = True
        for attempt in range(20):
            for digest, content in blobs.items():
                await self.push_blob(repository, digest, content, skip_present)
            status, body = await self.request("PUT", f"/v2/{repository}/manifests/{tag}", data=manifest,
                                              headers={"Content-Type": OCI_MANIFEST})
            if status == 201:
                pushed = Pushed(repository, manifest, blobs)
                self.tally.acknowledged[pushed.digest] = pushed
                self.tally.pushes += 1
                self.mine.append(pushed)
                for digest in blobs:
                    self.where[digest] = repository
                return
            assert status == 400 and b"MANIFEST_BLOB_UNKNOWN" in body, (status, body)
            # Collected before the manifest came (grace period 0): upload everything again.
            self.tally.refused_then_retried += 1
            skip_present = False
        raise AssertionError(f"worker {self.number}: a push kept being refused")

    async def push_blob(self, repository: str, digest: str, content: bytes, skip_present: bool) -> None:
        if skip_present:
            status, _ = await self.request("HEAD", f"/v2/{repository}/blobs/{digest}")
            if status == 200:
                return
        source = self.where.get(digest)
        if source and source != repository and self.rng.random() < 0.5:
            status, location = await self.request("POST", f"/v2/{repository}/blobs/uploads/?mount={digest}&from={source}",
                                                  want="Location")
            if status == 201:
                self.tally.mounts += 1
                return
            assert status == 202, status
            status, body = await self.request("PUT", f"{location}{'&' if '?' in location else '?'}digest={digest}",
                                              data=content)
            assert status == 201, (status, body)
            return
        status, body = await self.request("POST", f"/v2/{repository}/blobs/uploads/?digest={digest}", data=content)
        assert status == 201, (status, body)

    async def delete_image(self, pushed: Pushed) -> None:
        del self.tally.acknowledged[pushed.digest]  # in doubt from the moment the request leaves
        status, body = await self.request("DELETE", f"/v2/{pushed.repository}/manifests/{pushed.digest}")
        assert status == 202, (status, body)
        self.tally.deleted.append(pushed)

    async def request(self, method: str, path: str, *, want: str | None = None, **kwargs):
        for _ in range(50):
            async with self.session.request(method, self.base + path if path.startswith("/") else path,
                                            **kwargs) as r:
                body = await r.read()
                if r.status == 429:  # busy for a moment (a collection holding the store): retry
                    await asyncio.sleep(0.2)
                    continue
                return r.status, (r.headers.get(want, "") if want else body)
        raise AssertionError(f"{method} {path}: busy for too long")


def blob_bytes(root) -> int:
    return sum(p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file())


def stored_blobs(root) -> set[str]:
    return {f"{p.parent.parent.name}:{p.name}" for p in (root / "blobs").rglob("*") if p.is_file()}


async def collect_back_to_back(config_file, stop_at: float, tally: Tally, root) -> None:
    while time.monotonic() < stop_at:
        ran = await run_kura("gc", "--config", str(config_file), "--json", timeout=300)
        assert ran.returncode == 0, ran.stderr
        report = json.loads(ran.stdout)
        if report["skipped"]:
            tally.skipped_collections += 1
            await asyncio.sleep(0.05)
        else:
            tally.collections += 1
        tally.peak_bytes = max(tally.peak_bytes, blob_bytes(root))


async def stress(bases: list[str], config_file, root, seconds: float, seed: int) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        workers = [Worker(n, bases, session, tally, rng.random()) for n in range(WORKERS)]
        await asyncio.gather(collect_back_to_back(config_file, stop_at, tally, root),
                             *[w.run(stop_at) for w in workers])
    return tally


async def verify(bases: list[str], tally: Tally) -> None:
    async with aiohttp.ClientSession() as session:
        for n, pushed in enumerate(tally.acknowledged.values()):
            base = bases[n % len(bases)]
            async with session.get(f"{base}/v2/{pushed.repository}/manifests/{pushed.digest}") as r:
                assert r.status == 200, f"acknowledged {pushed.repository}@{pushed.digest} is gone"
                assert await r.read() == pushed.manifest
            for digest, content in pushed.blobs.items():
                async with session.get(f"{base}/v2/{pushed.repository}/blobs/{digest}") as r:
                    assert r.status == 200, f"{pushed.repository}@{pushed.digest}: blob {digest} is gone"
                    assert await r.read() == content


def run_stress(tmp_path, seconds: float, seed: int) -> None:
    root = tmp_path / "store"
    config_file = tmp_path / "kura.toml"
    config_file.write_text(f'[storage]\nroot = "{root}"\n[gc]\ninterval_seconds = 1\ngrace_seconds = 0\n')
    servers = [start_kura(root, None, "--config", str(config_file), log=tmp_path / f"kura-{n}.log")
               for n in range(2)]
    try:
        bases = [s.url for s in servers]
        started = time.monotonic()
        tally = asyncio.run(stress(bases, config_file, root, seconds, seed))
        elapsed = time.monotonic() - started
        asyncio.run(verify(bases, tally))
        before = blob_bytes(root)
        final = asyncio.run(run_kura("gc", "--config", str(config_file), "--json"))
        assert final.returncode == 0, final.stderr
        assert not json.loads(final.stdout)["skipped"]
        after = blob_bytes(root)
        asyncio.run(verify(bases, tally))  # still, after the final collection
    finally:
        for server in servers:
            stop(server)
    periodic = sum(len(re.findall("garbage collection freed", (tmp_path / f"kura-{n}.log").read_text()))
                   for n in range(2))
    result = fsck(root)
    assert result.returncode == 0, result.stdout
    # Exactly what the remaining images need is left: the bytes of deleted images are gone.
    needed = {d for pushed in tally.acknowledged.values() for d in [pushed.digest, *pushed.blobs]}
    assert stored_blobs(root) == needed
    for pushed in tally.deleted:
        for digest in {pushed.digest, *pushed.blobs} - needed:
            algorithm, encoded = digest.split(":")
            assert not (root / "blobs" / algorithm / encoded[:2] / encoded).exists()
    linked = {(p.parents[2].relative_to(root / "repositories").as_posix(), f"{p.parent.name}:{p.name}")
              for p in (root / "repositories").rglob("_layers/*/*")}
    assert linked == {(pushed.repository, d) for pushed in tally.acknowledged.values() for d in pushed.blobs}
    assert tally.pushes > 0 and tally.deleted and tally.collections > 0, tally
    print(f"\ngc stress: {elapsed:.0f} s, {tally.collections} `kura gc` collections (+{tally.skipped_collections} "
          f"found another running) and {periodic} periodic ones in the two servers; {tally.pushes} pushes "
          f"acknowledged ({tally.refused_then_retried} refused as their blobs were collected first, then retried; "
          f"{tally.mounts} mounts), {len(tally.deleted)} deleted, {len(tally.acknowledged)} left; blob bytes: "
          f"peak {tally.peak_bytes}, before the final collection {before}, after {after} "
          f"(needed by the images left: {sum(len(c) for d, c in _needed_contents(tally).items())})")


def _needed_contents(tally: Tally) -> dict[str, bytes]:
    contents = {}
    for pushed in tally.acknowledged.values():
        contents[pushed.digest] = pushed.manifest
        contents.update(pushed.blobs)
    return contents


def test_gc_under_load(tmp_path):
    run_stress(tmp_path, seconds=float(os.environ.get("KURA_GC_STRESS_SHORT_SECONDS", "20")), seed=20261201)


@pytest.mark.stress
def test_gc_under_load_long(tmp_path):
    run_stress(tmp_path, seconds=float(os.environ.get("KURA_GC_STRESS_SECONDS", "300")), seed=7)
