"""`GET /v2/` and `/v2/<name>/blobs/<digest>`: fetch, HEAD, Range, ETag, DELETE."""

from tests.conftest import error_code, upload_blob
from tests.support.client import sha256

DATA = bytes(range(256)) * 40  # 10 KiB


async def test_version_check(client):
    r = await client.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await r.json() == {}


async def test_errors_carry_api_version_header(client):
    r = await client.get(f"/v2/a/blobs/{sha256(b'x')}")
    assert r.status == 404
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_get_and_head_blob(client):
    digest = await upload_blob(client, "a/b", DATA)
    r = await client.get(f"/v2/a/b/blobs/{digest}")
    assert r.status == 200
    assert await r.read() == DATA
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["ETag"] == f'"{digest}"'
    assert r.headers["Accept-Ranges"] == "bytes"

    r = await client.head(f"/v2/a/b/blobs/{digest}")
    assert r.status == 200
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["Docker-Content-Digest"] == digest
    assert await r.read() == b""


async def test_empty_blob(client):
    digest = await upload_blob(client, "a", b"")
    r = await client.get(f"/v2/a/blobs/{digest}")
    assert r.status == 200 and await r.read() == b""
    assert r.headers["Content-Length"] == "0"


async def test_blob_only_visible_in_linked_repository(client):
    digest = await upload_blob(client, "one", DATA)
    r = await client.get(f"/v2/two/blobs/{digest}")
    assert r.status == 404
    assert await error_code(r) == "BLOB_UNKNOWN"


async def test_unknown_blob(client):
    r = await client.head(f"/v2/a/blobs/{sha256(b'nothing')}")
    assert r.status == 404


async def test_range_requests(client):
    digest = await upload_blob(client, "a", DATA)
    size = len(DATA)
    cases = {  # Range header -> (first byte, last byte)
        "bytes=0-9": (0, 9),
        "bytes=100-": (100, size - 1),
        "bytes=-5": (size - 5, size - 1),
        f"bytes=10-{size * 2}": (10, size - 1),
    }
    for header, (first, last) in cases.items():
        r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": header})
        assert r.status == 206, header
        assert await r.read() == DATA[first:last + 1], header
        assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header


async def test_unsatisfiable_range(client):
    digest = await upload_blob(client, "a", DATA)
    r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": f"bytes={len(DATA)}-"})
    assert r.status == 416
    assert r.headers["Content-Range"] == f"bytes */{len(DATA)}"


async def test_multiple_ranges_fall_back_to_whole_blob(client):
    digest = await upload_blob(client, "a", DATA)
    r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=0-1,5-6"})
    assert r.status == 200 and await r.read() == DATA


async def test_if_none_match(client):
    digest = await upload_blob(client, "a", DATA)
    r = await client.get(f"/v2/a/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert r.status == 304


async def test_invalid_digest_in_url(client):
    for bad in ("sha256:xyz", "md5:d41d8cd98f00b204e9800998ecf8427e", "nodigest"):
        r = await client.get(f"/v2/a/blobs/{bad}")
        assert r.status == 400, bad
        assert await error_code(r) == "DIGEST_INVALID"


async def test_delete_blob_unlinks_only_that_repository(client):
    digest = await upload_blob(client, "one", DATA)
    await upload_blob(client, "two", DATA)
    r = await client.delete(f"/v2/one/blobs/{digest}")
    assert r.status == 202
    assert (await client.head(f"/v2/one/blobs/{digest}")).status == 404
    assert (await client.head(f"/v2/two/blobs/{digest}")).status == 200
    r = await client.delete(f"/v2/one/blobs/{digest}")
    assert r.status == 404 and await error_code(r) == "BLOB_UNKNOWN"


async def test_delete_disabled(make_client):
    client = await make_client(delete_enabled=False)
    digest = await upload_blob(client, "a", DATA)
    r = await client.delete(f"/v2/a/blobs/{digest}")
    assert r.status == 405 and await error_code(r) == "UNSUPPORTED"
    assert (await client.head(f"/v2/a/blobs/{digest}")).status == 200


async def test_unknown_endpoint_and_method(client):
    r = await client.get("/v2/a/nothing-here")
    assert r.status == 404 and await error_code(r) == "UNSUPPORTED"
    r = await client.post(f"/v2/a/blobs/{sha256(b'x')}")
    assert r.status == 405 and await error_code(r) == "UNSUPPORTED"


async def test_range_digits_must_be_ascii(client):
    """`\\d` also matches other scripts' digits, which int() reads: `bytes=٠-٩` is not `bytes=0-9`.
    A malformed Range is ignored (RFC 9110), so the whole blob comes back."""
    digest = await upload_blob(client, "a", DATA)
    for header in ("bytes=\u0660-\u0669", "bytes=0-\u0669", "bytes=-\u0665", "bytes=\uff11-"):
        r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": header})
        assert r.status == 200, header
        assert "Content-Range" not in r.headers and await r.read() == DATA, header


async def test_range_with_thousands_of_digits_is_ignored_not_a_crash(client):
    """int() refuses 4,300+ digits: such a Range is malformed, so ignored (the whole blob)."""
    digest = await upload_blob(client, "a", DATA)
    for header in ("bytes=" + "1" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000):
        r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": header})
        assert r.status == 200 and await r.read() == DATA, header[:20]
    r = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=0-" + "9" * 19})
    assert r.status == 206 and await r.read() == DATA  # a 19-digit end is still an end
