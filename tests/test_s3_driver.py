"""What the S3 driver adds to the driver contract: several instances over one bucket (two
driver objects stand for two `kura serve` processes), against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import replace

import pytest

import storage.s3 as s3module
from storage import DigestMismatch, RangeMismatch, RepositoryBusy, StoreUnavailable, TooManyUploads, UploadBusy, UploadQuota
from storage.resumable_hash import ResumableHash
from storage.s3 import S3Driver
from storage.s3_objects import S3Location
from tests.contract.helpers import digest_of, read_all

pytestmark = pytest.mark.e2e


async def body(*parts: bytes):
    for part in parts:
        yield part


@pytest.fixture
def location(s3_bucket) -> S3Location:
    """A fresh store: its own prefix in the module's bucket."""
    return S3Location(s3_bucket.endpoint, s3_bucket.region, s3_bucket.bucket, f"t-{uuid.uuid4().hex[:10]}",
                      s3_bucket.access_key, s3_bucket.secret_key)


@pytest.fixture
async def two(location):
    """Two instances over one store."""
    first, second = S3Driver(location, guard_settle_seconds=0.3), S3Driver(location, guard_settle_seconds=0.3)
    await first.open()
    yield first, second
    await first.close()


async def test_a_chunked_upload_spread_over_instances_completes_verified(two):
    a, b = two
    data = os.urandom(3 * 1024 * 1024 + 5)
    upload = await a.create_upload("team/app", owner="alice")
    await b.append_upload(upload.uuid, body(data[:1000]), offset=0)
    await a.append_upload(upload.uuid, body(data[1000:2_000_000]), offset=1000)
    assert (await b.get_upload(upload.uuid)).size == 2_000_000
    await b.append_upload(upload.uuid, body(data[2_000_000:]), offset=2_000_000)
    blob = await a.commit_upload(upload.uuid, digest_of(data))
    assert blob.size == len(data)
    assert await read_all(b, digest_of(data)) == data
    assert await b.is_blob_linked("team/app", digest_of(data))


async def test_the_running_digest_lives_in_the_store_not_in_a_process(two, location):
    a, b = two
    data = os.urandom(200_000)
    upload = await a.create_upload("team/app")
    await a.append_upload(upload.uuid, body(data[:70_000]))
    await b.append_upload(upload.uuid, body(data[70_000:]))
    found = await a.bucket.get(f"uploads/{upload.uuid}")
    session = json.loads(found[0])
    assert ResumableHash.resume(session["hash"], len(data)).hexdigest() == hashlib.sha256(data).hexdigest()
    # A third instance, started after the bytes arrived, commits from that state alone.
    third = S3Driver(location)
    await third.commit_upload(upload.uuid, digest_of(data))
    assert await read_all(third, digest_of(data)) == data


async def test_one_chunk_is_committed_by_a_server_side_copy_checked_by_the_carried_digest(two):
    a, b = two
    data = os.urandom(100_000)
    upload = await a.create_upload("team/app")
    await a.append_upload(upload.uuid, body(data))
    session = json.loads((await a.bucket.get(f"uploads/{upload.uuid}"))[0])
    # Were the chunk read back at commit, this change would be caught; it is not read: the
    # digest carried with the session decides, and the wrong one is refused.
    with pytest.raises(DigestMismatch):
        await b.commit_upload(upload.uuid, digest_of(data[:-1]))
    assert await a.stat_blob(digest_of(data[:-1])) is None
    assert await a.bucket.head(session["chunks"][0]) is None  # the session ended, its chunk is gone


async def test_two_instances_appending_at_once_never_both_win(two):
    a, b = two
    upload = await a.create_upload("team/app")
    first, second = os.urandom(300_000), os.urandom(300_000)
    results = await asyncio.gather(a.append_upload(upload.uuid, body(first), offset=0),
                                   b.append_upload(upload.uuid, body(second), offset=0),
                                   return_exceptions=True)
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], (UploadBusy, RangeMismatch))
    kept = first if results[0] is won[0] else second
    assert (await a.get_upload(upload.uuid)).size == len(kept)
    await b.commit_upload(upload.uuid, digest_of(kept))
    assert await read_all(a, digest_of(kept)) == kept
    leftovers = [info.key for info in await a.bucket.list_all(f"upload-data/{upload.uuid}/")]
    assert leftovers == []  # the loser's chunk was removed, the winner's went with the session


async def test_a_corrupt_monolithic_upload_never_appears(two):
    a, _ = two
    data = os.urandom(20 * 1024 * 1024)  # several parts of a multipart upload
    wrong = digest_of(data + b"!")
    with pytest.raises(DigestMismatch):
        await a.put_blob("team/app", wrong, body(*[data[i:i + 1 << 20] for i in range(0, len(data), 1 << 20)]))
    assert await a.stat_blob(wrong) is None
    assert not await a.is_blob_linked("team/app", wrong)


async def test_a_repository_lock_holds_across_instances_and_a_dead_holders_lock_expires(two, monkeypatch):
    a, b = two
    monkeypatch.setattr(s3module, "LOCK_WAIT_SECONDS", 0.5)
    async with a.repository_lock("team/app"):
        started = time.monotonic()
        with pytest.raises(RepositoryBusy):
            async with b.repository_lock("team/app"):
                pass
        assert time.monotonic() - started >= 0.5
    async with b.repository_lock("team/app"):
        pass
    # A holder killed while holding it: its lease names a time already past.
    key = f"locks/repository/{hashlib.sha256(b'team/app').hexdigest()}"
    await a.bucket.put(key, json.dumps({"owner": "dead", "expires": time.time() - 1}).encode())
    async with b.repository_lock("team/app"):
        assert json.loads((await a.bucket.get(key))[0])["owner"] != "dead"


async def test_one_collection_at_a_time_across_instances(two):
    a, b = two
    async with a.collection() as first:
        assert first is not None
        async with b.collection() as second:
            assert second is None
    async with b.collection() as again:
        assert again is not None
    assert await a.last_collection() is not None


async def test_references_made_during_a_collection_are_journaled_and_deletes_wait_for_them(two):
    a, b = two
    referenced = digest_of(b"referenced while collecting")
    async with a.collection() as collection:
        entered, release = asyncio.Event(), asyncio.Event()

        async def push():
            async with b.reference_guard():
                await b.note_references(manifests=[referenced])
                entered.set()
                await release.wait()

        task = asyncio.create_task(push())
        await entered.wait()

        async def delete_phase():
            async with collection.exclusive():
                return await collection.read_journal()

        deleting = asyncio.create_task(delete_phase())
        await asyncio.sleep(0.5)
        assert not deleting.done()  # the exclusive phase waits for the guard in progress
        release.set()
        await task
        manifests, _ = await asyncio.wait_for(deleting, 10)
        assert manifests == {referenced}
        # A guard cannot enter while the collector deletes.
        inside, go = asyncio.Event(), asyncio.Event()

        async def later_push():  # a request of its own, not a task of the collector's
            await go.wait()
            async with b.reference_guard():
                inside.set()

        later = asyncio.create_task(later_push())
        async with collection.exclusive():
            go.set()
            await asyncio.sleep(0.3)
            assert not inside.is_set()
        await asyncio.wait_for(later, 10)
        assert inside.is_set()


async def test_upload_caps_hold_across_instances(two):
    a, b = two
    quota = UploadQuota(per_repository=3)
    attempts = [driver.create_upload("team/capped", quota=quota) for driver in (a, b) * 4]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    opened = [r for r in results if not isinstance(r, Exception)]
    assert all(isinstance(r, TooManyUploads) for r in results if isinstance(r, Exception))
    # Never over the cap; a burst at the cap may be refused whole (each retries after Retry-After).
    assert len(opened) <= 3
    for upload in opened:
        await a.cancel_upload(upload.uuid)
    one_by_one = [await driver.create_upload("team/capped", quota=quota) for driver in (a, b, a)]
    with pytest.raises(TooManyUploads):
        await b.create_upload("team/capped", quota=quota)
    await a.cancel_upload(one_by_one[0].uuid)
    assert await b.create_upload("team/capped", quota=quota)


async def test_an_unreachable_store_is_a_storage_error_not_a_hang():
    dead = S3Driver(S3Location("http://127.0.0.1:9", "us-east-1", "nowhere", "", "a", "b"))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await dead.stat_blob(digest_of(b"x"))
    assert time.monotonic() - started < 20
    await dead.close()


async def test_manifest_pushes_and_deletes_from_two_instances_leave_a_consistent_store(two):
    from storage import ManifestNotFound
    from storage import manifests as stored

    a, b = two
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    await a.put_blob("team/app", digest_of(config), body(config))

    def manifest(n: int) -> bytes:
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": str(digest_of(config)), "size": len(config)},
                           "layers": [], "annotations": {"n": str(n)}}).encode()

    async def push(driver, n):
        digest, _ = await stored.put_manifest(driver, "team/app", manifest(n), "application/vnd.oci.image.manifest.v1+json",
                                              tags=("latest", f"v{n}"))
        return digest

    async def delete(driver, n):
        with contextlib.suppress(ManifestNotFound):
            await stored.delete_manifest(driver, "team/app", digest_of(manifest(n)), stored.READ_LIMIT)

    pushed = await asyncio.gather(*(push(a if n % 2 else b, n) for n in range(8)))
    await asyncio.gather(*(delete(b if n % 2 else a, n) for n in range(0, 8, 2)),
                         *(push(a, n) for n in range(8, 12)))
    linked = {link.digest for link in await a.list_manifests("team/app")}
    for tag in await b.list_tags("team/app"):
        assert await a.resolve_tag("team/app", tag) in linked  # no tag names a missing manifest
    assert {str(d) for d in linked} == {str(d) for i, d in enumerate(pushed) if i % 2} | \
        {str(digest_of(manifest(n))) for n in range(8, 12)}


async def test_a_push_that_waited_for_the_lock_through_a_collection_never_references_deleted_blobs(location):
    """The guard looked before the collection started; the push then waited on the repository
    lock while the collection marked and deleted its (old, unreferenced) blobs. After the
    wait it must look and check again: the push fails (the client uploads the blobs again)
    rather than tagging a manifest whose layers are gone."""
    from storage import ManifestReferenceUnknown
    from storage.gc import GcSettings, collect
    from storage.manifests import put_manifest

    pusher, collector, holder = (S3Driver(location, guard_settle_seconds=1.0) for _ in range(3))
    await pusher.open()
    layer, config = os.urandom(1000), b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    for data in (layer, config):
        await pusher.put_blob("team/app", digest_of(data), body(data), length=len(data))
    await asyncio.sleep(2.5)  # older than the grace period below, and referenced by no manifest
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(digest_of(config)),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(digest_of(layer)),
                    "size": len(layer)}]}).encode()
    locked = asyncio.Event()

    async def hold_the_lock():
        async with holder.repository_lock("team/app"):
            locked.set()
            await asyncio.sleep(4)

    holding = asyncio.create_task(hold_the_lock())
    await locked.wait()
    push = asyncio.create_task(put_manifest(pusher, "team/app", manifest, "application/vnd.oci.image.manifest.v1+json",
                                            tags=("v1",)))
    await asyncio.sleep(0.2)
    report = await collect(collector, GcSettings(grace_seconds=2))
    await holding
    assert str(digest_of(layer)) in {str(d) for d, _ in report.blobs}  # the collection did delete it
    with pytest.raises(ManifestReferenceUnknown):
        await push
    assert await pusher.resolve_tag("team/app", "v1") is None


async def test_a_collector_that_lost_its_lease_leaves_its_successor_alone(location):
    """A collector whose store stalls longer than its lease is replaced; when it ends it must
    not remove the successor's lease or journal, so a mount made during the successor's run
    is still held off and journaled."""
    from urllib.parse import urlsplit

    from storage.gc import Collector, GcSettings
    from tests.support.tcp_relay import TcpRelay

    endpoint = urlsplit(location.endpoint)
    relay = await TcpRelay(endpoint.hostname, endpoint.port).start()
    stalling = S3Driver(replace(location, endpoint=f"http://{relay.address}"), guard_settle_seconds=0.2,
                        lease_seconds=1.0, collector_lease_seconds=1.0)
    successor, mounter = S3Driver(location, guard_settle_seconds=0.2), S3Driver(location, guard_settle_seconds=0.2)
    await successor.open()
    data = os.urandom(500)
    await mounter.put_blob("src/app", digest_of(data), body(data), length=len(data))
    await asyncio.sleep(1.2)
    try:
        async with stalling.collection() as first:
            assert first is not None
            await relay.cut()
            await asyncio.sleep(1.5)  # the store unreachable for longer than the lease
            # Taken over while the first is still cut off (once it reaches the store again it
            # may renew its expired lease itself if nobody has taken it: that is allowed).
            second_context = successor.collection()
            second = await second_context.__aenter__()
            assert second is not None  # it took over the expired lease
            await relay.start()
            await asyncio.sleep(1.0)  # the first's renewal now meets the successor's lease
        assert await successor.bucket.get("gc/running") is not None  # the first left it alone
        collector = Collector(successor, GcSettings(grace_seconds=1), second, time.time())
        await collector.mark()
        async with mounter.reference_guard():
            assert await mounter.stat_blob(digest_of(data)) is not None
            await mounter.note_references(blobs=[digest_of(data)])
            await mounter.link_blob("dst/app", digest_of(data))
        await collector.sweep()
        await second_context.__aexit__(None, None, None)
        assert await mounter.stat_blob(digest_of(data)) is not None
    finally:
        await relay.cut()


async def test_a_pulls_blob_lookup_may_be_a_few_seconds_old_a_pushs_never(two, monkeypatch):
    a, b = two
    monkeypatch.setattr(a._links, "seconds", 0.5)
    data = os.urandom(1000)
    await a.put_blob("team/app", digest_of(data), body(data), length=len(data))
    assert (await a.stat_linked_blob("team/app", digest_of(data), recent_ok=True)).size == len(data)
    assert await b.unlink_blob("team/app", digest_of(data))  # another instance deletes the link
    # A pull on the first instance may still see it for a moment; a push's check never does.
    assert await a.stat_linked_blob("team/app", digest_of(data), recent_ok=True) is not None
    assert await a.stat_linked_blob("team/app", digest_of(data)) is None
    await asyncio.sleep(0.6)
    assert await a.stat_linked_blob("team/app", digest_of(data), recent_ok=True) is None
    # Its own deletes it sees at once.
    await a.link_blob("team/app", digest_of(data))
    assert await a.stat_linked_blob("team/app", digest_of(data), recent_ok=True) is not None
    await a.unlink_blob("team/app", digest_of(data))
    assert await a.stat_linked_blob("team/app", digest_of(data), recent_ok=True) is None
