"""The suite every storage driver must pass (parametrise `driver` when a new one lands)."""

import asyncio
import hashlib
import json
import os
import shutil
import time

import pytest

from ocispec.digest import Digest
from storage import (
    BlobNotFound,
    DigestMismatch,
    FilesystemDriver,
    RangeMismatch,
    SizeMismatch,
    TooLarge,
    TooManyUploads,
    UploadInfo,
    UploadNotFound,
    UploadQuota,
)

DATA = b"abcdefghij" * 300_000  # 3 MB: more than one write batch


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


async def chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.fixture(params=["filesystem"])
def driver(request, tmp_path):
    return FilesystemDriver(tmp_path / "store")


@pytest.fixture
def second_driver(driver, tmp_path):
    """Another instance over the same store, as a second server process would have."""
    return FilesystemDriver(tmp_path / "store")


async def upload(driver, repo, data):
    session = await driver.create_upload(repo)
    await driver.append_upload(session.uuid, chunks(data))
    return await driver.commit_upload(session.uuid, digest_of(data))


async def test_upload_commit_and_read(driver):
    blob = await upload(driver, "a", DATA)
    assert blob.size == len(DATA)
    assert await driver.is_blob_linked("a", blob.digest)
    assert not await driver.is_blob_linked("b", blob.digest)
    assert (await driver.stat_blob(blob.digest)).size == len(DATA)
    assert b"".join([c async for c in driver.read_blob(blob.digest)]) == DATA
    assert b"".join([c async for c in driver.read_blob(blob.digest, 5, 10)]) == DATA[5:15]


async def test_chunked_offsets(driver):
    session = await driver.create_upload("a")
    info = await driver.append_upload(session.uuid, chunks(DATA[:1000]), offset=0, length=1000)
    assert info.size == 1000
    with pytest.raises(RangeMismatch) as exc:
        await driver.append_upload(session.uuid, chunks(DATA[:10]), offset=500)
    assert exc.value.current_size == 1000
    await driver.append_upload(session.uuid, chunks(DATA[1000:]), offset=1000)
    assert (await driver.get_upload(session.uuid)).size == len(DATA)
    await driver.commit_upload(session.uuid, digest_of(DATA), size=len(DATA))


async def test_failed_append_leaves_session_as_before(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:100]))

    async def broken():
        yield DATA[100:200]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await driver.append_upload(session.uuid, broken())
    assert (await driver.get_upload(session.uuid)).size == 100
    with pytest.raises(SizeMismatch):
        await driver.append_upload(session.uuid, chunks(DATA[100:200]), length=50)
    assert (await driver.get_upload(session.uuid)).size == 100
    await driver.append_upload(session.uuid, chunks(DATA[100:]))
    await driver.commit_upload(session.uuid, digest_of(DATA))


async def test_size_limit(driver):
    session = await driver.create_upload("a")
    with pytest.raises(TooLarge):
        await driver.append_upload(session.uuid, chunks(DATA), max_size=1000)
    assert (await driver.get_upload(session.uuid)).size == 0


async def test_digest_mismatch_stores_nothing_and_ends_session(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA))
    wrong = digest_of(b"other")
    with pytest.raises(DigestMismatch):
        await driver.commit_upload(session.uuid, wrong)
    assert await driver.stat_blob(digest_of(DATA)) is None
    assert await driver.stat_blob(wrong) is None
    with pytest.raises(UploadNotFound):
        await driver.get_upload(session.uuid)


async def test_size_mismatch_on_commit(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:10]))
    with pytest.raises(SizeMismatch):
        await driver.commit_upload(session.uuid, digest_of(DATA[:10]), size=11)
    assert await driver.stat_blob(digest_of(DATA[:10])) is None


async def test_continue_session_in_another_instance(driver, second_driver):
    """The running hash is a per-process cache; another process must re-hash, not trust."""
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:2_000_000]))
    await second_driver.append_upload(session.uuid, chunks(DATA[2_000_000:]), offset=2_000_000)
    with pytest.raises(DigestMismatch):
        await driver.commit_upload(session.uuid, digest_of(DATA[:2_000_000]))

    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:2_000_000]))
    await second_driver.append_upload(session.uuid, chunks(DATA[2_000_000:]))
    await driver.commit_upload(session.uuid, digest_of(DATA))
    assert (await second_driver.stat_blob(digest_of(DATA))).size == len(DATA)


async def test_sha512_commit(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA))
    blob = await driver.commit_upload(session.uuid, digest_of(DATA, "sha512"))
    assert blob.digest.algorithm == "sha512"


async def test_cancel_and_unknown(driver):
    session = await driver.create_upload("a")
    await driver.cancel_upload(session.uuid)
    for uuid in (session.uuid, "../../etc", "00000000-0000-4000-8000-000000000000"):
        with pytest.raises(UploadNotFound):
            await driver.get_upload(uuid)
        with pytest.raises(UploadNotFound):
            await driver.append_upload(uuid, chunks(b"x"))


async def test_purge(driver):
    import time
    old = await driver.create_upload("a")
    assert await driver.purge_uploads(time.time() - 3600) == 0
    assert await driver.purge_uploads(time.time() + 1) == 1
    with pytest.raises(UploadNotFound):
        await driver.get_upload(old.uuid)


async def test_purge_spares_sessions_in_use(driver):
    import fcntl
    import os
    import time
    busy = await driver.create_upload("a")
    idle = await driver.create_upload("a")
    fd = os.open(driver.layout.upload(busy.uuid) / "data", os.O_RDWR)  # a request holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert await driver.purge_uploads(time.time() + 1) == 1
        assert (await driver.get_upload(busy.uuid)).size == 0
        with pytest.raises(UploadNotFound):
            await driver.get_upload(idle.uuid)
    finally:
        os.close(fd)


async def test_purge_judges_by_last_activity(driver):
    import json
    import os
    import time
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(b"recent bytes"))
    directory = driver.layout.upload(session.uuid)
    info = json.loads((directory / "info").read_text())
    (directory / "info").write_text(json.dumps({**info, "started_at": time.time() - 7200}))
    # Started two hours ago, but written just now: not abandoned.
    assert await driver.purge_uploads(time.time() - 3600) == 0
    assert (await driver.get_upload(session.uuid)).size == len(b"recent bytes")
    old = time.time() - 7200
    os.utime(directory / "data", (old, old))
    assert await driver.purge_uploads(time.time() - 3600) == 1


async def test_small_blobs(driver):
    data = b'{"schemaVersion": 2}'
    d = digest_of(data)
    await driver.put_small_blob(data, d)
    await driver.put_small_blob(data, d)
    assert await driver.read_small_blob(d, 100) == data
    with pytest.raises(TooLarge):
        await driver.read_small_blob(d, 5)
    with pytest.raises(BlobNotFound):
        await driver.read_small_blob(digest_of(b"none"), 100)


async def test_links_tags_and_repositories(driver):
    d = digest_of(b"m")
    await driver.put_small_blob(b"m", d)
    await driver.link_manifest("x/y", d, "application/vnd.oci.image.manifest.v1+json")
    assert (await driver.get_manifest_link("x/y", d)).media_type == "application/vnd.oci.image.manifest.v1+json"
    assert await driver.get_manifest_link("x", d) is None
    await driver.set_tag("x/y", "b", d)
    await driver.set_tag("x/y", "a", d)
    assert await driver.list_tags("x/y") == ["a", "b"]
    assert await driver.resolve_tag("x/y", "a") == d
    assert await driver.delete_tag("x/y", "a")
    assert not await driver.delete_tag("x/y", "a")
    assert await driver.resolve_tag("x/y", "a") is None
    assert [link.digest for link in await driver.list_manifests("x/y")] == [d]
    await upload(driver, "x", b"blob")
    assert await driver.list_repositories() == ["x", "x/y"]
    assert await driver.repositories_linking_blob(digest_of(b"blob")) == ["x"]
    assert await driver.repository_exists("x/y") and not await driver.repository_exists("y")
    assert await driver.unlink_manifest("x/y", d)
    assert await driver.get_manifest_link("x/y", d) is None


async def test_referrers(driver):
    subject, referrer = digest_of(b"s"), digest_of(b"r")
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": str(referrer), "size": 1}
    await driver.add_referrer("a", subject, descriptor)
    assert await driver.list_referrers("a", subject) == [referrer]
    assert await driver.read_referrer("a", subject, referrer) == descriptor
    assert await driver.list_referrers("b", subject) == []
    await driver.remove_referrer("a", subject, referrer)
    assert await driver.list_referrers("a", subject) == []
    assert await driver.read_referrer("a", subject, referrer) is None


async def test_repository_lock_excludes_other_holders(driver, second_driver, monkeypatch):
    import asyncio

    from storage import RepositoryBusy, filesystem
    order = []

    async def hold(d, name, seconds):
        async with d.repository_lock("a"):
            order.append(f"{name} in")
            await asyncio.sleep(seconds)
            order.append(f"{name} out")

    await asyncio.gather(hold(driver, "first", 0.2), hold(second_driver, "second", 0))
    assert order in (["first in", "first out", "second in", "second out"],
                     ["second in", "second out", "first in", "first out"])
    monkeypatch.setattr(filesystem, "LOCK_WAIT_SECONDS", 0.05)
    async with driver.repository_lock("a"):
        with pytest.raises(RepositoryBusy):
            async with second_driver.repository_lock("a"):
                pass


async def test_paths_refuse_unvalidated_input(driver):
    with pytest.raises(ValueError):
        await driver.set_tag("../escape", "t", digest_of(b"x"))
    with pytest.raises(ValueError):
        await driver.set_tag("a", "../../t", digest_of(b"x"))
    with pytest.raises(ValueError):
        await driver.link_blob("a", Digest("sha256", "../../../etc/passwd"))


async def test_open_sessions_are_capped_across_processes(driver, second_driver):
    quota = UploadQuota(per_repository=5)
    results = await asyncio.gather(*[(driver if i % 2 else second_driver).create_upload("a", "alice", quota=quota)
                                     for i in range(12)], return_exceptions=True)
    refused = [r for r in results if not isinstance(r, UploadInfo)]
    assert len(refused) == 7
    assert all(isinstance(r, TooManyUploads) and (r.scope, r.limit) == ("repository", 5) for r in refused)
    assert isinstance(await driver.create_upload("b", "alice", quota=quota), UploadInfo)


async def test_only_open_sessions_count(driver):
    def quota():
        return UploadQuota(per_owner=3, active_since=time.time() - 3600)

    async def full():
        with pytest.raises(TooManyUploads) as refused:
            await driver.create_upload("x", "bob", quota=quota())
        assert (refused.value.scope, refused.value.limit) == ("user", 3)

    committed, cancelled, expiring = [await driver.create_upload(repo, "bob", quota=quota()) for repo in "abc"]
    await full()
    await driver.append_upload(committed.uuid, chunks(b"done"))
    await driver.commit_upload(committed.uuid, digest_of(b"done"))
    vanishing = await driver.create_upload("a", "bob", quota=quota())
    await full()
    await driver.cancel_upload(cancelled.uuid)
    await driver.create_upload("a", "bob", quota=quota())
    await full()
    directory = driver.layout.upload(expiring.uuid)  # abandoned two hours ago, not yet purged
    info = json.loads((directory / "info").read_text())
    (directory / "info").write_text(json.dumps({**info, "started_at": time.time() - 7200}))
    os.utime(directory / "data", (time.time() - 7200,) * 2)
    await driver.create_upload("a", "bob", quota=quota())
    await full()
    shutil.rmtree(driver.layout.upload(vanishing.uuid))  # a removal cut short by a crash
    await driver.create_upload("a", "bob", quota=quota())
    await full()
    assert isinstance(await driver.create_upload("a", "carol", quota=quota()), UploadInfo)
