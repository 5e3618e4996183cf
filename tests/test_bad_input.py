"""Each kind of bad input gets its spec error and leaves the store byte-for-byte unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from storage import FilesystemDriver
from storage.fsck import fsck
from tests.conftest import OCI_MANIFEST, error_code, image_manifest, push_image, upload_blob
from tests.support.client import sha256


def snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
async def prepared(client, config):
    """A store with an image and an upload session holding 100 bytes."""
    await push_image(client, "app", "v1")
    r = await client.post("/v2/app/blobs/uploads/")
    location = r.headers["Location"]
    r = await client.patch(location, data=b"x" * 100, headers={"Content-Range": "0-99"})
    assert r.status == 202
    return location, snapshot(config.root)


async def send_truncated(client, method: str, path: str, declared: int, sent: bytes, headers: str = "") -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n{headers}\r\n".encode() + sent)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def settle(client, config, before) -> dict:
    """Wait (bounded) for the server to finish handling a dropped request."""
    for _ in range(100):
        now = snapshot(config.root)
        if now == before and not any((config.root / "tmp").iterdir()):
            return now
        await asyncio.sleep(0.05)
    return snapshot(config.root)


async def bad_requests(client, location):
    config_digest = await upload_blob(client, "app", b"{}")  # already stored: a no-op
    good = image_manifest(config_digest, 2)
    five_mib = image_manifest(config_digest, 2, annotations={"pad": "x" * (5 << 20)})
    put = lambda ref, data, ct=OCI_MANIFEST: client.put(f"/v2/app/manifests/{ref}", data=data,
                                                        headers={"Content-Type": ct})
    return [
        ("malformed JSON", put("v2", b'{"schemaVersion": 2,'), 400, "MANIFEST_INVALID"),
        ("wrong media type", put("v2", good, "application/vnd.docker.distribution.manifest.v2+json"),
         400, "MANIFEST_INVALID"),
        ("unknown media type", put("v2", good, "application/x-tar"), 415, "UNSUPPORTED"),
        ("manifest digest mismatch", put(sha256(b"nope"), good), 400, "DIGEST_INVALID"),
        ("5 MiB manifest", put("v2", five_mib), 413, "MANIFEST_INVALID"),
        ("blob digest mismatch",
         client.post(f"/v2/app/blobs/uploads/?digest={sha256(b'other')}", data=b"data"), 400, "DIGEST_INVALID"),
        ("unknown algorithm", client.post("/v2/app/blobs/uploads/?digest=md5:" + "0" * 32, data=b"data"),
         400, "DIGEST_INVALID"),
        ("unknown algorithm in URL", client.get("/v2/app/blobs/sha1:" + "0" * 40), 400, "DIGEST_INVALID"),
        ("chunk out of order", client.patch(location, data=b"y" * 10, headers={"Content-Range": "500-509"}),
         416, "BLOB_UPLOAD_INVALID"),
        ("overlapping chunk", client.patch(location, data=b"y" * 10, headers={"Content-Range": "90-99"}),
         416, "BLOB_UPLOAD_INVALID"),
        ("unknown upload id", client.patch("/v2/app/blobs/uploads/00000000-0000-4000-8000-000000000000",
                                           data=b"z"), 404, "BLOB_UPLOAD_UNKNOWN"),
        ("uppercase name", client.post("/v2/App/blobs/uploads/"), 400, "NAME_INVALID"),
        ("manifest missing blob", put("v3", image_manifest(config_digest, 2, [(sha256(b"gone"), 4)])),
         400, "MANIFEST_BLOB_UNKNOWN"),
        ("schema 1", put("v2", b'{"schemaVersion": 1, "fsLayers": []}',
                         "application/vnd.docker.distribution.manifest.v1+prettyjws"), 415, "UNSUPPORTED"),
    ]


async def test_bad_requests_leave_store_unchanged(client, config, prepared):
    location, before = prepared
    for label, request, status, code in await bad_requests(client, location):
        r = await request
        assert r.status == status, f"{label}: {r.status} {await r.text()}"
        assert await error_code(r) == code, label
        assert snapshot(config.root) == before, f"{label} changed the store"
    assert (await client.get(location)).headers["Range"] == "0-99"
    assert (await fsck(FilesystemDriver(config.root))).ok


async def test_truncated_uploads_leave_store_unchanged(client, config, prepared):
    location, before = prepared
    await send_truncated(client, "POST", f"/v2/app/blobs/uploads/?digest={sha256(b'a' * 1000)}", 1000, b"a" * 500)
    assert await settle(client, config, before) == before
    await send_truncated(client, "PATCH", location, 1000, b"a" * 500, "Content-Range: 100-1099\r\n")
    assert await settle(client, config, before) == before
    await send_truncated(client, "PUT", "/v2/app/manifests/v9", 5000, b'{"schemaVersion": 2, ',
                         f"Content-Type: {OCI_MANIFEST}\r\n")
    assert await settle(client, config, before) == before
    # The session is still usable after all that.
    r = await client.patch(location, data=b"x" * 10, headers={"Content-Range": "100-109"})
    assert r.status == 202 and r.headers["Range"] == "0-109"
    assert (await fsck(FilesystemDriver(config.root))).ok


async def test_invalid_repository_names_touch_nothing(client, config, prepared):
    _, before = prepared
    from tests.test_api_listing import raw_request
    for name in ("a/../app", "..", "APP", "app/../../etc"):
        status, body = await raw_request(client, "POST", f"/v2/{name}/blobs/uploads/")
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID", name
    assert snapshot(config.root) == before
