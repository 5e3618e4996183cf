"""`/v2/<name>/blobs/uploads/`: monolithic, chunked, status, cancel, mount."""

import base64
import gzip
from dataclasses import replace

import pytest

from registry.app import make_app
from registry.auth import htpasswd
from registry.auth.config import parse
from tests.conftest import error_code, serve_app, upload_blob
from tests.support.client import sha256

DATA = b"0123456789" * 1000


async def start(client, repo="a"):
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202
    return r


async def test_start_upload_headers(client):
    r = await start(client)
    uuid = r.headers["Docker-Upload-UUID"]
    assert r.headers["Location"] == f"/v2/a/blobs/uploads/{uuid}"
    assert r.headers["Range"] == "0-0"


async def test_chunk_min_length_advertised(client, make_client):
    r = await start(client)
    assert r.headers["OCI-Chunk-Min-Length"] == str(1 << 20)
    r = await start(await make_client(chunk_min_length=0))
    assert "OCI-Chunk-Min-Length" not in r.headers


async def test_monolithic_post_with_digest(client):
    r = await client.post(f"/v2/a/blobs/uploads/?digest={sha256(DATA)}", data=DATA)
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/a/blobs/{sha256(DATA)}"
    assert r.headers["Docker-Content-Digest"] == sha256(DATA)
    assert await (await client.get(f"/v2/a/blobs/{sha256(DATA)}")).read() == DATA


async def test_monolithic_post_then_put(client):
    location = (await start(client)).headers["Location"]
    r = await client.put(f"{location}?digest={sha256(DATA)}", data=DATA)
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == sha256(DATA)


async def test_chunked_upload_with_status(client):
    location = (await start(client)).headers["Location"]
    for start_at in range(0, len(DATA), 3000):
        chunk = DATA[start_at:start_at + 3000]
        r = await client.patch(location, data=chunk, headers={
            "Content-Range": f"{start_at}-{start_at + len(chunk) - 1}",
            "Content-Type": "application/octet-stream"})
        assert r.status == 202, await r.text()
        assert r.headers["Range"] == f"0-{start_at + len(chunk) - 1}"
        location = r.headers["Location"]
        status = await client.get(location)
        assert status.status == 204
        assert status.headers["Range"] == f"0-{start_at + len(chunk) - 1}"
    r = await client.put(f"{location}?digest={sha256(DATA)}")
    assert r.status == 201
    assert await (await client.get(f"/v2/a/blobs/{sha256(DATA)}")).read() == DATA


async def test_streamed_patch_without_content_range(client):
    location = (await start(client)).headers["Location"]

    async def stream():
        for i in range(0, len(DATA), 1000):
            yield DATA[i:i + 1000]

    r = await client.patch(location, data=stream())
    assert r.status == 202
    assert r.headers["Range"] == f"0-{len(DATA) - 1}"
    r = await client.put(f"{location}?digest={sha256(DATA)}")
    assert r.status == 201


async def test_last_chunk_in_put(client):
    location = (await start(client)).headers["Location"]
    r = await client.patch(location, data=DATA[:5000], headers={"Content-Range": "0-4999"})
    assert r.status == 202
    r = await client.put(f"{location}?digest={sha256(DATA)}", data=DATA[5000:],
                         headers={"Content-Range": f"5000-{len(DATA) - 1}"})
    assert r.status == 201, await r.text()


async def test_out_of_order_chunk_is_416_and_session_stays_usable(client):
    location = (await start(client)).headers["Location"]
    await client.patch(location, data=DATA[:100], headers={"Content-Range": "0-99"})
    for bad_range in ("200-299", "50-149", "0-99"):
        r = await client.patch(location, data=DATA[:100], headers={"Content-Range": bad_range})
        assert r.status == 416, bad_range
        assert r.headers["Range"] == "0-99"
    r = await client.patch(location, data=DATA[100:], headers={"Content-Range": f"100-{len(DATA) - 1}"})
    assert r.status == 202
    assert (await client.put(f"{location}?digest={sha256(DATA)}")).status == 201


async def test_content_length_must_match_content_range(client):
    location = (await start(client)).headers["Location"]
    r = await client.patch(location, data=DATA[:10], headers={"Content-Range": "0-19"})
    assert r.status == 400 and await error_code(r) == "SIZE_INVALID"
    assert (await client.get(location)).headers["Range"] == "0-0"


async def test_digest_mismatch_stores_nothing(client, config):
    wrong = sha256(b"something else")
    r = await client.post(f"/v2/a/blobs/uploads/?digest={wrong}", data=DATA)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/a/blobs/{wrong}")).status == 404
    assert [p for p in (config.root / "blobs").rglob("*") if p.is_file()] == []

    location = (await start(client)).headers["Location"]
    await client.patch(location, data=DATA)
    r = await client.put(f"{location}?digest={wrong}")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/a/blobs/{sha256(DATA)}")).status == 404


async def test_put_without_or_with_bad_digest(client):
    location = (await start(client)).headers["Location"]
    r = await client.put(location, data=DATA)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    location = (await start(client)).headers["Location"]
    r = await client.put(f"{location}?digest=md5:0123456789abcdef0123456789abcdef", data=DATA)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_sha512_digest(client):
    import hashlib
    digest = "sha512:" + hashlib.sha512(DATA).hexdigest()
    r = await client.post(f"/v2/a/blobs/uploads/?digest={digest}", data=DATA)
    assert r.status == 201
    assert await (await client.get(f"/v2/a/blobs/{digest}")).read() == DATA


async def test_unknown_upload(client):
    for uuid in ("00000000-0000-4000-8000-000000000000", "not-a-uuid", "..%2F..%2Fetc"):
        r = await client.get(f"/v2/a/blobs/uploads/{uuid}")
        assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN", uuid
        r = await client.patch(f"/v2/a/blobs/uploads/{uuid}", data=b"x")
        assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN", uuid


async def test_upload_is_bound_to_its_repository(client):
    uuid = (await start(client, "a")).headers["Docker-Upload-UUID"]
    r = await client.patch(f"/v2/b/blobs/uploads/{uuid}", data=DATA)
    assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    r = await client.put(f"/v2/b/blobs/uploads/{uuid}?digest={sha256(b'')}")
    assert r.status == 404


async def test_cancel_upload(client):
    location = (await start(client)).headers["Location"]
    await client.patch(location, data=DATA)
    r = await client.delete(location)
    assert r.status == 204
    assert (await client.get(location)).status == 404
    assert (await client.put(f"{location}?digest={sha256(DATA)}")).status == 404


async def test_session_survives_a_new_server_on_the_same_root(aiohttp_client, config):
    """Upload state lives in storage: a second app (process) continues the session."""
    first = await aiohttp_client(make_app(config))
    location = (await start(first)).headers["Location"]
    await first.patch(location, data=DATA[:4000], headers={"Content-Range": "0-3999"})
    second = await aiohttp_client(make_app(config))
    r = await second.get(location)
    assert r.status == 204 and r.headers["Range"] == "0-3999"
    r = await second.patch(location, data=DATA[4000:], headers={"Content-Range": f"4000-{len(DATA) - 1}"})
    assert r.status == 202
    r = await second.put(f"{location}?digest={sha256(DATA)}")
    assert r.status == 201, await r.text()
    assert await (await first.get(f"/v2/a/blobs/{sha256(DATA)}")).read() == DATA


async def test_mount_from_other_repository(client):
    digest = await upload_blob(client, "src", DATA)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={digest}&from=src")
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/dst/blobs/{digest}"
    assert r.headers["Docker-Content-Digest"] == digest
    assert await (await client.get(f"/v2/dst/blobs/{digest}")).read() == DATA


async def test_mount_without_from(client):
    digest = await upload_blob(client, "src", DATA)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={digest}")
    assert r.status == 201
    assert (await client.head(f"/v2/dst/blobs/{digest}")).status == 200


@pytest.mark.parametrize("source", ["elsewhere", "Bad..Name"])
async def test_mount_falls_back_to_upload(client, source):
    digest = await upload_blob(client, "src", DATA)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={digest}&from={source}")
    assert r.status == 202
    assert "Docker-Upload-UUID" in r.headers
    assert (await client.head(f"/v2/dst/blobs/{digest}")).status == 404


async def test_mount_of_unknown_blob_falls_back_to_upload(client):
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={sha256(b'nope')}&from=src")
    assert r.status == 202


async def test_blob_size_limit(make_client):
    client = await make_client(max_blob_bytes=1000)
    r = await client.post(f"/v2/a/blobs/uploads/?digest={sha256(DATA)}", data=DATA)
    assert r.status == 413 and await error_code(r) == "SIZE_INVALID"
    location = (await start(client)).headers["Location"]
    await client.patch(location, data=DATA[:600])
    r = await client.patch(location, data=DATA[600:1200])
    assert r.status == 413
    assert (await client.get(location)).headers["Range"] == "0-599"


async def test_same_blob_many_times(client):
    for _ in range(3):
        assert await upload_blob(client, "a", DATA) == sha256(DATA)


async def test_content_range_digits_must_be_ascii(client):
    location = (await start(client)).headers["Location"]
    for header in ("\u0660-\u0669", "0-\u0669", "bytes \u0660-9/10", "0-9/\u0661\u0660",
                   "0-" + "9" * 5000, "1" * 5000 + "-2", "0-9/" + "9" * 5000):
        r = await client.patch(location, data=DATA[:10], headers={"Content-Range": header})
        assert r.status == 400 and await error_code(r) == "BLOB_UPLOAD_INVALID", header
    assert (await client.get(location)).headers["Range"] == "0-0"


async def test_content_encoding_is_not_undone(client):
    """Bodies are stored as sent, as the reference registry stores them: a gzip-encoded body
    is the blob (its digest is over those bytes), never inflated (8 KiB would become 8 MiB)."""
    wire = gzip.compress(bytes(8 << 20))
    encoded = {"Content-Encoding": "gzip"}
    r = await client.post(f"/v2/a/blobs/uploads/?digest={sha256(wire)}", data=wire, headers=encoded)
    assert r.status == 201, await r.text()
    assert await (await client.get(f"/v2/a/blobs/{sha256(wire)}")).read() == wire

    location = (await start(client)).headers["Location"]
    r = await client.patch(location, data=wire, headers=encoded)
    assert r.status == 202 and r.headers["Range"] == f"0-{len(wire) - 1}"
    r = await client.put(f"{location}?digest={sha256(bytes(8 << 20))}")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_open_sessions_per_repository_are_capped(make_client):
    client = await make_client(max_upload_sessions_per_repository=2)
    first = await start(client, "a")
    await start(client, "a")
    r = await client.post("/v2/a/blobs/uploads/")
    assert r.status == 429 and await error_code(r) == "TOOMANYREQUESTS"
    assert int(r.headers["Retry-After"]) > 0
    await start(client, "b")  # each repository has its own count
    r = await client.put(f"{first.headers['Location']}?digest={sha256(b'')}")
    assert r.status == 201  # a finished session no longer counts
    await start(client, "a")


async def test_open_sessions_per_user_are_capped(aiohttp_client, config):
    for user in ("alice", "bob"):
        htpasswd.set_user(config.root / "auth" / "htpasswd", user, f"{user}-password", cost=4)
    client = await serve_app(aiohttp_client, replace(config, max_upload_sessions_per_user=2,
                                                     auth=parse({"mode": "htpasswd"})))

    def signed_in(user):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{user}-password".encode()).decode()}

    for repo in ("x", "y"):
        assert (await client.post(f"/v2/{repo}/blobs/uploads/", headers=signed_in("alice"))).status == 202
    r = await client.post("/v2/z/blobs/uploads/", headers=signed_in("alice"))
    assert r.status == 429 and await error_code(r) == "TOOMANYREQUESTS"
    location = (await client.post("/v2/z/blobs/uploads/", headers=signed_in("bob"))).headers["Location"]
    assert (await client.delete(location, headers=signed_in("bob"))).status == 204
