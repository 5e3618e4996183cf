"""Quotas end to end: skopeo pushes into a namespace with a quota, and two server processes on one root."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from storage import FilesystemDriver
from storage.fsck import fsck
from tests.support.client import sha256
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import start_kura, stop

AMD64 = ("latest-amd64", 1_084_097 + 482 + 349)  # layer + config + manifest of the busybox layout
ARM64 = ("latest-arm64", 1_036_722 + 484 + 349)
ARM64_LAYER = "f2d53d118c25c28e73a70aca23f3833e3483e43dc92868cbe07a4f08040afb8e"


def write_config(path: Path, max_bytes: int) -> Path:
    path.write_text(f'[[quota]]\nrepositories = ["quota/**"]\nmax_bytes = {max_bytes}\n')
    return path


def skopeo_push(server, tag: str, repo: str) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                           f"oci:{IMAGES / 'busybox-multiarch'}:{tag}", f"docker://{server.host}/{repo}:1"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def kura(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.e2e
def test_skopeo_push_over_a_quota_is_denied_until_room_is_made(tmp_path):
    require_shared()
    root = tmp_path / "root"
    config = write_config(tmp_path / "kura.toml", 1_500_000)
    server = start_kura(root, None, "--config", str(config))
    try:
        pushed = skopeo_push(server, AMD64[0], "quota/a")
        assert pushed.returncode == 0, pushed.stderr

        refused = skopeo_push(server, ARM64[0], "quota/b")
        assert refused.returncode != 0
        assert "denied: quota exceeded: the quota on quota/** allows 1500000 bytes and " \
               f"{AMD64[1]} are used" in refused.stderr, refused.stderr
        assert not any(path.name == ARM64_LAYER for path in (root / "blobs").rglob("*"))
        assert not (root / "repositories" / "quota" / "b" / "_layers" / "sha256" / ARM64_LAYER).exists()
        assert os.listdir(root / "uploads") == []
        assert asyncio.run(fsck(FilesystemDriver(root))).ok

        # Deleting a repository makes room at once (its blobs go at the next collection).
        deleted = kura("repo", "delete", "quota/a", "--config", str(config), "--root", str(root), "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert "quota quota/**: 0 of 1500000 bytes used" in deleted.stdout
        pushed = skopeo_push(server, ARM64[0], "quota/b")
        assert pushed.returncode == 0, pushed.stderr

        assert "denied: quota exceeded" in skopeo_push(server, AMD64[0], "quota/c").stderr
    finally:
        stop(server)

    # A larger quota, and the same push goes through.
    server = start_kura(root, None, "--config", str(write_config(config, 3_000_000)))
    try:
        pushed = skopeo_push(server, AMD64[0], "quota/c")
        assert pushed.returncode == 0, pushed.stderr
        usage = json.loads(kura("du", "--config", str(config), "--root", str(root), "--json").stdout)
        assert usage["quotas"] == [{"repositories": ["quota/**"], "max_bytes": 3_000_000,
                                    "used_bytes": AMD64[1] + ARM64[1]}]
    finally:
        stop(server)


@pytest.mark.e2e
def test_one_quota_across_two_server_processes(tmp_path):
    root = tmp_path / "root"
    config = tmp_path / "kura.toml"
    config.write_text('[[quota]]\nrepositories = ["team/**"]\nmax_bytes = 100000\n')
    servers = [start_kura(root, None, "--config", str(config)) for _ in range(2)]
    blobs = [bytes([n]) * 10_000 for n in range(24)]  # room for exactly 10 of them

    async def push(session: aiohttp.ClientSession, number: int) -> tuple[int, str]:
        server = servers[number % 2]
        async with session.post(f"{server.url}/v2/team/r{number % 3}/blobs/uploads/") as r:
            location = r.headers["Location"]
        async with session.patch(f"{server.url}{location}", data=blobs[number]) as r:
            location = r.headers["Location"]
        other = servers[(number + 1) % 2]  # the commit lands on the other process
        async with session.put(f"{other.url}{location}?digest={sha256(blobs[number])}") as r:
            body = await r.text()
            return r.status, json.loads(body)["errors"][0]["code"] if r.status != 201 else ""

    async def push_all() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(push(session, n) for n in range(len(blobs))))

    async def mount_accepted(accepted: list[int]) -> list[int]:
        """A blob the namespace already holds is free, even into another repository of it."""
        async with aiohttp.ClientSession() as session:
            statuses = []
            for n in accepted:
                url = f"{servers[n % 2].url}/v2/team/elsewhere/blobs/uploads/?digest={sha256(blobs[n])}"
                async with session.post(url, data=blobs[n]) as r:
                    statuses.append(r.status)
            return statuses

    try:
        results = asyncio.run(push_all())
        accepted = [n for n, (status, _) in enumerate(results) if status == 201]
        assert len(accepted) == 10, results
        assert {result for result in results if result[0] != 201} == {(403, "DENIED")}
        assert asyncio.run(mount_accepted(accepted)) == [201] * 10
    finally:
        for server in servers:
            stop(server)
    stored = {path.name for path in (root / "blobs").rglob("*") if path.is_file()}
    assert stored == {sha256(blobs[n]).split(":")[1] for n in accepted}
    assert os.listdir(root / "uploads") == []
    assert asyncio.run(fsck(FilesystemDriver(root))).ok
    usage = json.loads(kura("du", "--config", str(config), "--root", str(root), "--json").stdout)
    assert usage["quotas"][0]["used_bytes"] == 100_000
