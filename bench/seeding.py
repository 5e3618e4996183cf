"""Deterministic content for the benchmark, pushed the same way to every registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import aiohttp

from tests.support.layouts import put_blob
from tests.support.paths import IMAGES

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def push_shared_image(host: str, image: str = "redis", tag: str = "7", name: str = "library/redis") -> None:
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{IMAGES / image}:{tag}", f"docker://{host}/{name}:{tag}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)


async def get_manifest(url: str, name: str, reference: str) -> tuple[bytes, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v2/{name}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}) as r:
            assert r.status == 200, r.status
            return await r.read(), r.headers["Content-Type"]


async def put_tags(url: str, name: str, manifest: bytes, content_type: str, tags: list[str],
                   concurrency: int = 16) -> None:
    queue = list(tags)
    async with aiohttp.ClientSession() as session:
        async def worker():
            while queue:
                tag = queue.pop()
                async with session.put(f"{url}/v2/{name}/manifests/{tag}", data=manifest,
                                       headers={"Content-Type": content_type}) as r:
                    assert r.status == 201, (r.status, await r.text())
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def mount_into(url: str, digest: str, source: str, names: list[str], concurrency: int = 16) -> None:
    """Make each of `names` a repository holding one blob (a cross-repository mount)."""
    queue = list(names)
    async with aiohttp.ClientSession() as session:
        async def worker():
            while queue:
                name = queue.pop()
                async with session.post(f"{url}/v2/{name}/blobs/uploads/", params={"mount": digest, "from": source}) as r:
                    assert r.status == 201, (r.status, await r.text())
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def layered_image(directory: Path, layers: int, layer_bytes: int = 64 << 10) -> str:
    """An OCI image layout of `layers` distinct uncompressed layers (deterministic content);
    returns its tag."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes) -> dict:
        return put_blob(blobs, data)

    descriptors = []
    for number in range(layers):
        seed = hashlib.sha256(f"layer {layers}/{number}".encode()).digest()
        data = (seed * (layer_bytes // len(seed) + 1))[:layer_bytes]
        descriptors.append(dict(blob(data), mediaType=OCI_LAYER))
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
              "diff_ids": [d["digest"] for d in descriptors]}, "config": {}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": dict(blob(json.dumps(config).encode()), mediaType=OCI_CONFIG), "layers": descriptors}
    data = json.dumps(manifest).encode()
    tag = f"layers{layers}"
    index = {"schemaVersion": 2, "manifests": [dict(blob(data), mediaType=OCI_MANIFEST,
                                                   annotations={"org.opencontainers.image.ref.name": tag})]}
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return tag
