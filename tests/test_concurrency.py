"""Many clients, two server processes, one store: same blob, same tag, at once."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp

from tests.support.client import RegistryClient, sha256
from tests.support.servers import start_kura, stop
from tests.test_crash_safety import fsck

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLIENTS = 16


async def push_same_things(bases: list[str], blob: bytes) -> tuple[set[str], str, list[str]]:
    async with aiohttp.ClientSession() as session:
        clients = [RegistryClient(session, bases[i % len(bases)]) for i in range(CLIENTS)]
        digests = await asyncio.gather(*[
            c.push_blob("shared/app", blob, chunk_size=(len(blob) // 3 if i % 2 else None))
            for i, c in enumerate(clients)])
        assert set(digests) == {sha256(blob)}
        config = await clients[0].push_blob("shared/app", b"{}")
        manifests = [json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(blob),
                        "size": len(blob)}],
            "annotations": {"client": str(i)}}).encode() for i in range(CLIENTS)]
        pushed = await asyncio.gather(*[c.push_manifest("shared/app", "latest", m, OCI_MANIFEST)
                                        for c, m in zip(clients, manifests)])
        answers = []
        for base in bases:
            async with session.get(f"{base}/v2/shared/app/manifests/latest") as r:
                assert r.status == 200
                answers.append(r.headers["Docker-Content-Digest"])
        return set(pushed), answers[0], answers


def test_same_blob_and_tag_from_many_clients_on_two_processes(tmp_path):
    root = tmp_path / "store"
    servers = [start_kura(root), start_kura(root)]
    try:
        blob = os.urandom(3 * 1024 * 1024)
        pushed, latest, answers = asyncio.run(push_same_things([s.url for s in servers], blob))
    finally:
        for server in servers:
            stop(server)
    assert len(pushed) == CLIENTS
    assert latest in pushed and set(answers) == {latest}
    blob_files = [p for p in (root / "blobs").rglob("*") if p.is_file() and p.stat().st_size == len(blob)]
    assert len(blob_files) == 1
    assert list((root / "uploads").iterdir()) == []
    result = fsck(root)
    assert result.returncode == 0, result.stdout


async def push_and_delete(bases: list[str], rounds: int) -> None:
    async with aiohttp.ClientSession() as session:
        clients = [RegistryClient(session, bases[i % len(bases)]) for i in range(CLIENTS)]
        config = await clients[0].push_blob("race/app", b"{}")
        for n in range(rounds):
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
                "layers": [], "annotations": {"round": str(n)}}).encode()
            await clients[0].push_manifest("race/app", "seed", manifest, OCI_MANIFEST)

            async def delete(client):
                async with session.delete(client.url(f"/v2/race/app/manifests/{sha256(manifest)}")) as r:
                    assert r.status in (202, 404), await r.text()

            await asyncio.gather(*[
                client.push_manifest("race/app", f"t{n}-{i}", manifest, OCI_MANIFEST) if i % 3 else delete(client)
                for i, client in enumerate(clients)])
        async with session.get(f"{bases[0]}/v2/race/app/tags/list") as r:
            tags = (await r.json())["tags"]
        for tag in tags:
            async with session.head(f"{bases[1]}/v2/race/app/manifests/{tag}") as r:
                assert r.status == 200, f"tag {tag} survived its manifest's delete"


def test_pushes_racing_deletes_never_leave_a_dangling_tag(tmp_path):
    root = tmp_path / "store"
    servers = [start_kura(root), start_kura(root)]
    try:
        asyncio.run(push_and_delete([s.url for s in servers], rounds=20))
    finally:
        for server in servers:
            stop(server)
    result = fsck(root)
    assert result.returncode == 0, result.stdout
