"""What Kura's S3 driver relies on, pinned against the real S3 server of the tests (SeaweedFS)
through the `obstore` library: conditional writes, listing with a delimiter, ranged reads,
presigned URLs, and one bucket per test module."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from datetime import timedelta
from pathlib import Path

import aiohttp
import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import S3Store

from tests.support.seaweedfs import S3Bucket, SeaweedFS, signed_request


def open_store(bucket: S3Bucket) -> S3Store:
    return S3Store(bucket.bucket, endpoint=bucket.endpoint, region=bucket.region,
                   access_key_id=bucket.access_key, secret_access_key=bucket.secret_key,
                   client_options={"allow_http": True})


@pytest.fixture
def store(s3_bucket) -> S3Store:
    return open_store(s3_bucket)


@pytest.fixture
def key(request) -> str:
    """A key prefix of the test's own inside the module's bucket."""
    return request.node.name.replace("[", "-").replace("]", "")


async def test_bucket_is_fresh_and_named_after_the_module(seaweedfs, s3_bucket, store):
    assert s3_bucket.bucket.startswith("test-seaweedfs-")
    assert s3_bucket.region == "us-east-1"
    assert s3_bucket.endpoint.startswith("http://127.0.0.1:")
    # Made for this module: nothing in it but what this module's tests wrote (under their names).
    assert all(o["path"].startswith("test_") for o in await obstore.list(store).collect_async())
    status, _, listing = seaweedfs.request("GET", "/")
    assert status == 200 and f"<Name>{s3_bucket.bucket}</Name>".encode() in listing


async def test_create_is_refused_when_the_object_exists(store, key):
    await obstore.put_async(store, f"{key}/a", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        await obstore.put_async(store, f"{key}/a", b"second", mode="create")
    assert bytes(await (await obstore.get_async(store, f"{key}/a")).bytes_async()) == b"first"


async def test_update_is_refused_on_a_stale_etag(store, key):
    first = await obstore.put_async(store, f"{key}/tag", b"one")
    second = await obstore.put_async(store, f"{key}/tag", b"two", mode={"e_tag": first["e_tag"]})
    assert second["e_tag"] != first["e_tag"]
    with pytest.raises(PreconditionError):
        await obstore.put_async(store, f"{key}/tag", b"three", mode={"e_tag": first["e_tag"]})
    assert bytes(await (await obstore.get_async(store, f"{key}/tag")).bytes_async()) == b"two"
    # An update of an object that does not exist is refused too (If-Match on nothing).
    with pytest.raises((PreconditionError, FileNotFoundError)):
        await obstore.put_async(store, f"{key}/missing", b"x", mode={"e_tag": first["e_tag"]})


async def test_one_of_twenty_concurrent_creates_wins(store, key):
    """SeaweedFS makes same-key conditional writes atomic with a per-object lock (seaweedfs/seaweedfs
    #8800, #8802: in 4.16 several concurrent creates could all win). The losers wait for that lock:
    on this machine, with 4.48, the last of the 20 answers after 0.01 to 15 s."""
    async def create(i: int) -> int | None:
        try:
            await obstore.put_async(store, f"{key}/contested", f"writer {i}".encode(), mode="create")
            return i
        except AlreadyExistsError:
            return None

    outcomes = await asyncio.gather(*(create(i) for i in range(20)))
    winners = [i for i in outcomes if i is not None]
    assert len(winners) == 1, outcomes
    stored = bytes(await (await obstore.get_async(store, f"{key}/contested")).bytes_async())
    assert stored == f"writer {winners[0]}".encode()


async def test_list_with_delimiter(store, key):
    for name in ("top", "dir/one", "dir/two", "dir/sub/three", "dir/sub/deeper/four"):
        await obstore.put_async(store, f"{key}/{name}", name.encode())
    listed = await obstore.list_with_delimiter_async(store, f"{key}/dir")
    assert sorted(o["path"] for o in listed["objects"]) == [f"{key}/dir/one", f"{key}/dir/two"]
    assert listed["common_prefixes"] == [f"{key}/dir/sub"]
    assert {o["size"] for o in listed["objects"]} == {7}
    top = await obstore.list_with_delimiter_async(store, key)
    assert [o["path"] for o in top["objects"]] == [f"{key}/top"]
    assert top["common_prefixes"] == [f"{key}/dir"]
    # A flat listing sees everything below, sorted by key.
    flat = await obstore.list(store, f"{key}/dir").collect_async()
    assert [o["path"] for o in flat] == sorted(f"{key}/dir/{n}" for n in ("one", "two", "sub/three", "sub/deeper/four"))


async def test_range_get(store, key):
    data = bytes(range(256)) * 16
    await obstore.put_async(store, f"{key}/blob", data)
    assert bytes(await obstore.get_range_async(store, f"{key}/blob", start=100, end=1000)) == data[100:1000]
    assert bytes(await obstore.get_range_async(store, f"{key}/blob", start=4000, length=96)) == data[4000:]
    result = await obstore.get_async(store, f"{key}/blob", options={"range": {"offset": 4090}})
    assert bytes(await result.bytes_async()) == data[4090:]
    assert result.meta["size"] == len(data)
    with pytest.raises(FileNotFoundError):
        await obstore.get_range_async(store, f"{key}/nothing", start=0, end=1)


async def test_presigned_get(store, key, s3_bucket):
    await obstore.put_async(store, f"{key}/signed", b"bytes from the object store")
    url = await obstore.sign_async(store, "GET", f"{key}/signed", timedelta(minutes=5))
    assert url.startswith(f"{s3_bucket.endpoint}/{s3_bucket.bucket}/") and "X-Amz-Signature=" in url
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            assert r.status == 200
            assert await r.read() == b"bytes from the object store"
        async with session.get(url, headers={"Range": "bytes=6-9"}) as r:
            assert r.status == 206 and await r.read() == b"from"
        # The signature is checked: without it, or with another one, the object stays private.
        async with session.get(url.split("?")[0]) as r:
            assert r.status == 403
        tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        async with session.get(tampered) as r:
            assert r.status == 403


async def test_wrong_sha256_checksum_is_refused(seaweedfs, s3_bucket, store, key):
    """The server verifies x-amz-checksum-sha256 (the driver can have every blob checked as it lands)."""
    body = b"checked on arrival"
    good = base64.b64encode(hashlib.sha256(body).digest()).decode()
    bad = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    path = f"/{s3_bucket.bucket}/{key}/obj"
    status, _, answer = seaweedfs.request("PUT", path, body=body, headers={"x-amz-checksum-sha256": bad})
    assert status == 400 and b"BadDigest" in answer, answer
    with pytest.raises(FileNotFoundError):
        await obstore.head_async(store, f"{key}/obj")
    status, headers, _ = seaweedfs.request("PUT", path, body=body, headers={"x-amz-checksum-sha256": good})
    assert status == 200
    assert bytes(await (await obstore.get_async(store, f"{key}/obj")).bytes_async()) == body


async def test_no_bucket_is_made_on_the_fly(seaweedfs: SeaweedFS, key):
    """A PUT into a bucket nobody created fails (autoCreateBucket is off), so a driver that forgets
    to create its bucket is caught by the tests."""
    missing = open_store(seaweedfs.bucket("never-created-bucket"))
    with pytest.raises(Exception) as raised:
        await obstore.put_async(missing, f"{key}/x", b"x")
    assert "NoSuchBucket" in str(raised.value) or isinstance(raised.value, FileNotFoundError), raised.value
    status, _, listing = seaweedfs.request("GET", "/")
    assert status == 200 and b"never-created-bucket" not in listing


async def test_buckets_of_two_modules_do_not_see_each_other(seaweedfs, s3_bucket, store, key):
    other_bucket = seaweedfs.new_bucket("tests.test_some_other_module")  # what that module's fixture gets
    assert other_bucket.bucket.startswith("test-some-other-module-") and other_bucket.bucket != s3_bucket.bucket
    other = open_store(other_bucket)
    await obstore.put_async(store, f"{key}/same-name", b"mine")
    await obstore.put_async(other, f"{key}/same-name", b"theirs")
    await obstore.put_async(other, f"{key}/only-theirs", b"theirs")
    assert bytes(await (await obstore.get_async(store, f"{key}/same-name")).bytes_async()) == b"mine"
    assert bytes(await (await obstore.get_async(other, f"{key}/same-name")).bytes_async()) == b"theirs"
    assert [o["path"] for o in await obstore.list(store, key).collect_async()] == [f"{key}/same-name"]
    assert sorted(o["path"] for o in await obstore.list(other).collect_async()) == [
        f"{key}/only-theirs", f"{key}/same-name"]
    with pytest.raises(FileNotFoundError):
        await obstore.head_async(store, f"{key}/only-theirs")


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_two_servers_at_once_listen_only_on_their_own_ports(seaweedfs, tmp_path):
    """No fixed port (9101, 8181, 6060, 8111...): a second server starts beside the session's."""
    with SeaweedFS(tmp_path / "second") as second:
        first_ports, second_ports = listening_ports(seaweedfs.process.pid), listening_ports(second.process.pid)
        assert first_ports <= set(seaweedfs.ports.values()), first_ports - set(seaweedfs.ports.values())
        assert second_ports <= set(second.ports.values()), second_ports - set(second.ports.values())
        assert {seaweedfs.ports["s3"], seaweedfs.ports["metrics"]} <= first_ports
        assert not first_ports & second_ports
        assert second.access_key != seaweedfs.access_key
        mine = second.create_bucket("second-server")
        assert second.request("PUT", f"/{mine.bucket}/k", body=b"v")[0] == 200
        assert second.list_keys(mine.bucket) == ["k"]
        # Credentials are per server.
        assert seaweedfs.request("GET", f"/{mine.bucket}")[0] == 404
        assert signed_request(second.endpoint, seaweedfs.access_key, seaweedfs.secret_key, "GET", "/")[0] == 403
    assert second.process is None
