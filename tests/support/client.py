"""A small distribution-API client for tests: pushes blobs, manifests and OCI layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str):
        self.session = session
        self.base = base_url.rstrip("/")

    def url(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    async def push_blob(self, repo: str, data: bytes, *, chunk_size: int | None = None) -> str:
        digest = sha256(data)
        async with self.session.post(self.url(f"/v2/{repo}/blobs/uploads/")) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        if chunk_size:
            for start in range(0, len(data), chunk_size):
                chunk = data[start:start + chunk_size]
                headers = {"Content-Range": f"{start}-{start + len(chunk) - 1}",
                           "Content-Type": "application/octet-stream"}
                async with self.session.patch(self.url(location), data=chunk, headers=headers) as r:
                    assert r.status == 202, await r.text()
                    location = r.headers["Location"]
            body = b""
        else:
            body = data
        sep = "&" if "?" in location else "?"
        async with self.session.put(self.url(f"{location}{sep}digest={digest}"), data=body,
                                    headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201, await r.text()
        return digest

    async def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        async with self.session.put(self.url(f"/v2/{repo}/manifests/{reference}"), data=data,
                                    headers={"Content-Type": media_type}) as r:
            assert r.status == 201, await r.text()
            return r.headers["Docker-Content-Digest"]

    async def push_layout_manifest(self, layout: Path, repo: str, digest: str, reference: str,
                                   media_type: str | None = None) -> None:
        """Push the manifest `digest` of an OCI layout and, first, everything it references."""
        data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
        document = json.loads(data)
        for child in document.get("manifests", []):
            await self.push_layout_manifest(layout, repo, child["digest"], child["digest"], child.get("mediaType"))
        for descriptor in [document["config"], *document.get("layers", [])] if "config" in document else []:
            blob = (layout / "blobs" / "sha256" / descriptor["digest"].split(":", 1)[1]).read_bytes()
            await self.push_blob(repo, blob)
        await self.push_manifest(repo, reference, data, document.get("mediaType") or media_type)

    async def push_layout(self, layout: Path, repo: str, tag: str) -> str:
        index = json.loads((layout / "index.json").read_text())
        entry = next(m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
        await self.push_layout_manifest(layout, repo, entry["digest"], tag, entry.get("mediaType"))
        return entry["digest"]
