"""SIGKILL the server in the middle of uploads and manifest pushes, over and over; then the
store must pass fsck, every tag must resolve, and every acknowledged push must still be there."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.support.client import sha256
from tests.support.paths import REPO
from tests.support.servers import free_port, start_kura

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WORKERS = 4


async def push_blob(session, base, repo, data, rng) -> str:
    digest = sha256(data)
    if rng.random() < 0.3:
        async with session.post(f"{base}/v2/{repo}/blobs/uploads/?digest={digest}", data=data) as r:
            assert r.status == 201, await r.text()
        return digest
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202
        location = r.headers["Location"]
    step = max(1, len(data) // 4)
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        async with session.patch(base + location, data=chunk,
                                 headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"}) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
    async with session.put(f"{base}{location}?digest={digest}") as r:
        assert r.status == 201, await r.text()
    return digest


async def worker(base: str, number: int, rng: random.Random, acknowledged: dict) -> None:
    repo = f"crash/w{number % 2}"
    async with aiohttp.ClientSession() as session:
        while True:
            layer = rng.randbytes(rng.choice([1000, 300_000, 3_000_000]))
            config = json.dumps({"worker": number, "n": rng.random()}).encode()
            layer_digest = await push_blob(session, base, repo, layer, rng)
            config_digest = await push_blob(session, base, repo, config, rng)
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer_digest, "size": len(layer)}]}).encode()
            tag = f"t{number}-{rng.randrange(1 << 30)}"
            for reference in (tag, "latest"):
                async with session.put(f"{base}/v2/{repo}/manifests/{reference}", data=manifest,
                                       headers={"Content-Type": OCI_MANIFEST}) as r:
                    assert r.status == 201, await r.text()
            acknowledged[(repo, tag)] = sha256(manifest)
            if rng.random() < 0.25:
                # Delete one of this worker's manifests. Its tags are in doubt from the moment
                # the request leaves: a kill may land before or after the delete.
                mine = [key for key in acknowledged if key[0] == repo and key[1].startswith(f"t{number}-")]
                victim = acknowledged[rng.choice(mine)]
                for key in [k for k, d in acknowledged.items() if d == victim]:
                    del acknowledged[key]
                async with session.delete(f"{base}/v2/{repo}/manifests/{victim}") as r:
                    assert r.status == 202, await r.text()


async def run_until_killed(base: str, pid: int, delay: float, seed: int, acknowledged: dict) -> None:
    rng = random.Random(seed)
    tasks = [asyncio.create_task(worker(base, i, random.Random(rng.random()), acknowledged))
             for i in range(WORKERS)]
    await asyncio.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        # After the kill every worker must have failed on the connection, not on an assertion.
        assert isinstance(result, (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)), repr(result)


async def verify_through_api(base: str, acknowledged: dict) -> int:
    checked = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v2/_catalog") as r:
            repositories = (await r.json())["repositories"]
        for repo in repositories:
            async with session.get(f"{base}/v2/{repo}/tags/list") as r:
                tags = (await r.json())["tags"]
            for tag in tags:
                async with session.get(f"{base}/v2/{repo}/manifests/{tag}") as r:
                    assert r.status == 200, f"tag {repo}:{tag} does not resolve"
                    body = await r.read()
                    assert sha256(body) == r.headers["Docker-Content-Digest"]
                manifest = json.loads(body)
                for descriptor in [manifest["config"], *manifest["layers"]]:
                    async with session.head(f"{base}/v2/{repo}/blobs/{descriptor['digest']}") as r:
                        assert r.status == 200, f"{repo}:{tag} references missing {descriptor['digest']}"
                        assert int(r.headers["Content-Length"]) == descriptor["size"]
                checked += 1
        for (repo, tag), digest in acknowledged.items():
            async with session.head(f"{base}/v2/{repo}/manifests/{tag}") as r:
                assert r.status == 200, f"acknowledged push {repo}:{tag} was lost"
                assert r.headers["Docker-Content-Digest"] == digest
    return checked


def fsck(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", "fsck", "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def kill_loop(tmp_path, rounds: int, seed: int) -> None:
    root = tmp_path / "store"
    port = free_port()
    rng = random.Random(seed)
    acknowledged: dict = {}
    for round_number in range(rounds):
        server = start_kura(root, port, log=tmp_path / "kura.log")
        asyncio.run(run_until_killed(server.url, server.process.pid, rng.uniform(0.2, 1.5), rng.random(),
                                     acknowledged))
        assert server.process.wait(timeout=10) == -signal.SIGKILL
        result = fsck(root)
        assert result.returncode == 0, f"round {round_number}: fsck failed\n{result.stdout}"
    server = start_kura(root, port, log=tmp_path / "kura.log")
    try:
        checked = asyncio.run(verify_through_api(server.url, acknowledged))
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
    assert acknowledged, "no push completed in any round: the test proved nothing"
    assert checked >= len(acknowledged)


def test_sigkill_during_pushes(tmp_path):
    kill_loop(tmp_path, rounds=15, seed=20261128)


@pytest.mark.stress
def test_sigkill_during_pushes_many_rounds(tmp_path):
    kill_loop(tmp_path, rounds=int(os.environ.get("KURA_CRASH_ROUNDS", "100")), seed=1)
