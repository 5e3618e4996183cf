"""What only the filesystem driver has: its files, their times, flock()s and the journal's
format. Everything the StorageDriver interface promises is tested, for every driver, by the
contract suite in tests/contract/."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import time

import pytest

from storage import BlobNotFound, FilesystemDriver, TooManyUploads, UploadNotFound, UploadQuota

from .contract.helpers import chunks, digest_of, upload


@pytest.fixture
def driver(tmp_path):
    return FilesystemDriver(tmp_path / "store")


def backdate(path, seconds=7200):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


async def test_purge_spares_sessions_in_use(driver):
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


async def test_purge_judges_by_the_data_files_time(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(b"recent bytes"))
    directory = driver.layout.upload(session.uuid)
    info = json.loads((directory / "info").read_text())
    (directory / "info").write_text(json.dumps({**info, "started_at": time.time() - 7200}))
    # Started two hours ago, but written just now: not abandoned.
    assert await driver.purge_uploads(time.time() - 3600) == 0
    assert (await driver.get_upload(session.uuid)).size == len(b"recent bytes")
    backdate(directory / "data")
    assert await driver.purge_uploads(time.time() - 3600) == 1


async def test_a_session_whose_removal_was_cut_short_does_not_count(driver):
    quota = UploadQuota(per_owner=2)
    sessions = [await driver.create_upload("a", "bob", quota=quota) for _ in range(2)]
    with pytest.raises(TooManyUploads):
        await driver.create_upload("a", "bob", quota=quota)
    shutil.rmtree(driver.layout.upload(sessions[0].uuid))  # a crash left its index entry behind
    await driver.create_upload("a", "bob", quota=quota)
    with pytest.raises(TooManyUploads):
        await driver.create_upload("a", "bob", quota=quota)


async def test_linking_again_touches_the_link_and_the_blob(driver):
    blob = await upload(driver, "a", b"content")
    link = driver.layout.layer_link("a", blob.digest)
    for path in (link, driver.layout.blob(blob.digest)):
        backdate(path)
    await driver.link_blob("a", blob.digest)
    assert time.time() - link.stat().st_mtime < 60
    assert time.time() - driver.layout.blob(blob.digest).stat().st_mtime < 60


async def test_a_journal_record_is_read_once_complete(driver, tmp_path):
    a = digest_of(b"a")
    collector = FilesystemDriver(tmp_path / "store")
    async with collector.collection() as run:
        with open(driver.layout.gc_journal, "ab") as f:
            f.write(f"\nb {str(a)[:20]}".encode())
        assert await run.read_journal() == (set(), set())
        with open(driver.layout.gc_journal, "ab") as f:
            f.write(f"{str(a)[20:]}\nx junk\nb sha256:short\n".encode())
        assert await run.read_journal() == (set(), {a})
    assert not driver.layout.gc_journal.exists() and not driver.layout.gc_marker.exists()


async def test_a_crashed_collectors_journal_is_replaced(driver):
    driver.layout.gc.mkdir()
    driver.layout.gc_marker.write_text('{"id": "crashed"}')
    driver.layout.gc_journal.write_text(f"b {digest_of(b'stale')}\n")
    async with driver.collection() as run:
        assert json.loads(driver.layout.gc_marker.read_text())["id"] != "crashed"
        assert await run.read_journal() == (set(), set())
    assert not driver.layout.gc_marker.exists()


async def test_stray_and_misfiled_files_are_not_listed_as_blobs(driver):
    blob = await upload(driver, "a", b"layer")
    (driver.layout.blobs / "sha256" / "zz").mkdir()
    (driver.layout.blobs / "sha256" / "zz" / "not-a-digest").write_text("stray")
    (driver.layout.blobs / "sha256" / "zz" / digest_of(b"x").encoded).write_bytes(b"x")
    assert [b.digest async for b in driver.iter_blobs()] == [blob.digest]
    problems, notes = await driver.check_layout()
    assert len(problems) == 2 and notes == []


async def test_an_emptied_repository_leaves_no_directory(driver):
    blob = await upload(driver, "team", b"x")
    await upload(driver, "team/app", b"y")
    await driver.unlink_blob("team", blob.digest)
    (driver.layout.repository("team") / "_referrers" / "sha256" / "ab").mkdir(parents=True)
    assert await driver.remove_repository_if_empty("team")
    assert driver.layout.repository("team").is_dir()  # it holds team/app
    await driver.unlink_blob("team/app", digest_of(b"y"))
    assert await driver.remove_repository_if_empty("team/app")
    assert list(driver.layout.repositories.iterdir()) == []


async def test_purge_temp(driver):
    old, new = driver.layout.tmp / "old.tmp", driver.layout.tmp / "new.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    backdate(old)
    assert await driver.purge_temp(time.time() - 3600) == 1
    assert not old.exists() and new.exists()
    assert (await driver.check_layout())[1] == ["1 unfinished temp file(s) in tmp/ (harmless; purged with old uploads)"]


async def test_a_manifest_read_once_is_served_from_memory_until_deleted(driver):
    data = b'{"schemaVersion": 2}'
    digest = digest_of(data)
    await driver.put_small_blob(data, digest)
    os.unlink(driver.layout.blob(digest))  # behind the driver's back
    assert await driver.read_small_blob(digest, 1024) == data
    await driver.delete_blobs([digest])
    with pytest.raises(BlobNotFound):
        await driver.read_small_blob(digest, 1024)


async def test_waiters_for_a_repository_lock_take_their_turns_in_order(driver):
    order = []
    holder_in = asyncio.Event()
    release = asyncio.Event()

    async def holder():
        async with driver.repository_lock("app"):
            holder_in.set()
            await release.wait()

    async def waiter(n):
        async with driver.repository_lock("app"):
            order.append(n)
            await asyncio.sleep(0.002)  # long enough for a poller behind to look in between

    first = asyncio.create_task(holder())
    await holder_in.wait()
    waiters = []
    for n in range(8):
        waiters.append(asyncio.create_task(waiter(n)))
        await asyncio.sleep(0.001)  # arrive one after another
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == list(range(8))
    assert driver._local_turns._locks == {}  # nothing kept once nobody waits


async def test_a_repush_leaves_the_links_it_would_write_alone(driver):
    digest = digest_of(b"manifest")
    async with driver.staged_manifest_links("app", digest, "application/x", None, ("v1",)) as install:
        await install()
    link, tag = driver.layout.revision_link("app", digest), driver.layout.tag("app", "v1")
    before = (os.stat(link).st_ino, os.stat(tag).st_ino)
    async with driver.staged_manifest_links("app", digest, "application/x", None, ("v1",)) as install:
        await install()
    assert (os.stat(link).st_ino, os.stat(tag).st_ino) == before
    assert not list(driver.layout.tmp.iterdir())  # no staged file left behind


async def test_a_link_removed_while_a_push_waits_for_the_lock_is_written_again(driver):
    digest = digest_of(b"manifest")
    async with driver.staged_manifest_links("app", digest, "application/x", None, ("v1",)) as install:
        await install()
    async with driver.staged_manifest_links("app", digest, "application/x", None, ("v1", "v2")) as install:
        await driver.unlink_manifest("app", digest)  # a delete that went first
        await driver.delete_tag("app", "v1")
        await install()
    assert (await driver.get_manifest_link("app", digest)).media_type == "application/x"
    assert await driver.resolve_tag("app", "v1") == digest
    assert await driver.resolve_tag("app", "v2") == digest
    assert not list(driver.layout.tmp.iterdir())


def test_writeback_is_started_on_the_file_it_is_asked_about(tmp_path):
    """sync_file_range is called for real (an unknown descriptor is its EBADF, ignored)."""
    from storage import writeback

    assert writeback._sync_file_range is not None  # Linux: the call is found
    path = tmp_path / "data"
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        writeback.start_writeback(f.fileno(), 0, 4096)
    writeback.start_writeback(987654, 0, 4096)  # no such descriptor: ignored
    assert path.read_bytes() == b"x" * 4096
