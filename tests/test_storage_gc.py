"""The driver primitives garbage collection is built on: the reference guard and its
journal, one collection at a time, snapshots, batch deletes, empty repositories."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from ocispec.digest import Digest
from storage import FilesystemDriver, RepositoryBusy
from storage import filesystem as fs

from .test_storage_driver import chunks, digest_of, upload


@pytest.fixture
def driver(tmp_path):
    return FilesystemDriver(tmp_path / "store")


@pytest.fixture
def other(driver, tmp_path):
    """A second driver on the same store, as another `kura serve` or `kura gc` process has."""
    return FilesystemDriver(tmp_path / "store")


def backdate(path, seconds=7200):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


async def entered_within(context, seconds: float) -> bool:
    """Whether `context` (an async context manager) is entered within `seconds`; if so it
    is left again."""
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def hold():
        async with context:
            entered.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    try:
        await asyncio.wait_for(entered.wait(), seconds)
        return True
    except TimeoutError:
        return False
    finally:
        leave.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_linking_again_makes_the_link_and_the_blob_young(driver):
    blob = await upload(driver, "a", b"content")
    link = driver.layout.layer_link("a", blob.digest)
    for path in (link, driver.layout.blob(blob.digest)):
        backdate(path)
    await driver.link_blob("a", blob.digest)  # a mount, or a commit of the same content
    assert time.time() - link.stat().st_mtime < 60
    assert time.time() - driver.layout.blob(blob.digest).stat().st_mtime < 60
    await driver.link_blob("b", blob.digest)
    assert (await driver.snapshot_repository("b")).layers.keys() == {blob.digest}


async def test_one_collection_at_a_time_across_processes(driver, other):
    assert await driver.last_collection() is None
    async with driver.collection() as first:
        assert first is not None
        async with other.collection() as second:
            assert second is None
    async with other.collection() as again:
        assert again is not None
    assert time.time() - await driver.last_collection() < 60


async def test_references_are_journaled_only_while_a_collection_runs(driver, other):
    a, b, c = (digest_of(x) for x in (b"a", b"b", b"c"))
    async with driver.reference_guard():
        await driver.note_references(blobs=[a])  # no collection: nothing to note
    async with other.collection() as run:
        assert await run.read_journal() == (set(), set())
        async with driver.reference_guard():
            await driver.note_references(manifests=[a], blobs=[b, c])
        assert await run.read_journal() == ({a}, {b, c})
        assert await run.read_journal() == (set(), set())  # only what is new
        # A record still being written is read once it is complete.
        with open(driver.layout.gc_journal, "ab") as f:
            f.write(f"\nb {str(a)[:20]}".encode())
        assert await run.read_journal() == (set(), set())
        with open(driver.layout.gc_journal, "ab") as f:
            f.write(f"{str(a)[20:]}\n".encode())
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


async def test_the_exclusive_guard_waits_for_references_in_progress(driver, other):
    async with other.collection() as run:
        async with driver.reference_guard():
            assert not await entered_within(run.exclusive(), 0.3)
        assert await entered_within(run.exclusive(), 5)
        async with run.exclusive():
            assert not await entered_within(driver.reference_guard(), 0.3)
        assert await entered_within(driver.reference_guard(), 5)


async def test_references_do_not_starve_a_waiting_collection(driver, other):
    """While a collection waits for the guard, newcomers wait behind it (the turnstile)."""
    order = []
    async with other.collection() as run:
        first = driver.reference_guard()
        await first.__aenter__()

        async def collector():
            async with run.exclusive():
                order.append("collector")

        async def newcomer():
            async with driver.reference_guard():
                order.append("newcomer")

        waiting = asyncio.create_task(collector())
        await asyncio.sleep(0.1)
        late = asyncio.create_task(newcomer())
        await asyncio.sleep(0.3)
        assert order == []  # both wait for the first holder
        await first.__aexit__(None, None, None)
        await asyncio.wait_for(asyncio.gather(waiting, late), 10)
    assert order == ["collector", "newcomer"]


async def test_guard_times_out_as_busy(driver, other, monkeypatch):
    monkeypatch.setattr(fs, "LOCK_WAIT_SECONDS", 0.2)
    async with other.collection() as run, run.exclusive():
        with pytest.raises(RepositoryBusy):
            async with driver.reference_guard():
                pass


async def test_a_busy_commit_keeps_its_session(driver, other, monkeypatch):
    monkeypatch.setattr(fs, "LOCK_WAIT_SECONDS", 0.2)
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(b"data"))
    async with other.collection() as run, run.exclusive():
        with pytest.raises(RepositoryBusy):
            await driver.commit_upload(session.uuid, digest_of(b"data"))
    await driver.commit_upload(session.uuid, digest_of(b"data"))  # the client retries: it is still there
    assert await driver.is_blob_linked("a", digest_of(b"data"))


async def test_snapshot_and_blob_listing(driver):
    blob = await upload(driver, "team/app", b"layer")
    manifest = digest_of(b"manifest")
    await driver.put_small_blob(b"manifest", manifest)
    await driver.link_manifest("team/app", manifest, "application/vnd.oci.image.manifest.v1+json")
    await driver.set_tag("team/app", "v1", manifest)
    snapshot = await driver.snapshot_repository("team/app")
    assert snapshot.name == "team/app"
    assert snapshot.layers.keys() == {blob.digest} and snapshot.revisions.keys() == {manifest}
    assert snapshot.tags["v1"].digest == manifest and snapshot.tags.keys() == {"v1"}
    (driver.layout.blobs / "sha256" / "zz").mkdir()
    (driver.layout.blobs / "sha256" / "zz" / "not-a-digest").write_text("stray")
    listed = {b.digest: b.size async for b in driver.iter_blobs()}
    assert listed == {blob.digest: 5, manifest: 8}


async def test_batch_deletes(driver):
    one, two = await upload(driver, "a", b"one"), await upload(driver, "a", b"two")
    await driver.link_blob("b", one.digest)
    await driver.unlink_blobs([("a", one.digest), ("b", one.digest), ("a", Digest.parse(str(digest_of(b"x"))))])
    await driver.delete_blobs([one.digest])
    assert await driver.stat_blob(one.digest) is None and await driver.stat_blob(two.digest) is not None
    assert not await driver.is_blob_linked("a", one.digest) and await driver.is_blob_linked("a", two.digest)


async def test_only_empty_repositories_are_removed(driver):
    blob = await upload(driver, "team", b"x")
    await upload(driver, "team/app", b"y")
    assert not await driver.remove_repository_if_empty("team")
    await driver.unlink_blob("team", blob.digest)
    (driver.layout.repository("team") / "_referrers" / "sha256" / "ab").mkdir(parents=True)
    assert await driver.remove_repository_if_empty("team")
    assert await driver.list_repositories() == ["team/app"]  # the nested one keeps the directory
    await driver.unlink_blob("team/app", digest_of(b"y"))
    assert await driver.remove_repository_if_empty("team/app")
    assert await driver.list_repositories() == []
    assert list(driver.layout.repositories.iterdir()) == []


async def test_purge_temp(driver):
    old, new = driver.layout.tmp / "old.tmp", driver.layout.tmp / "new.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    backdate(old)
    assert await driver.purge_temp(time.time() - 3600) == 1
    assert not old.exists() and new.exists()


async def test_content_a_cache_evicted_goes_within_the_grace_period_unless_linked_elsewhere(driver):
    from storage.gc import GcSettings, collect
    alone = await upload(driver, "docker.io/library/a", b"only the cache had it")
    shared = await upload(driver, "docker.io/library/a", b"also pushed to team/app")
    await upload(driver, "team/app", b"also pushed to team/app")
    evicted = {"docker.io/library/a": {str(alone.digest), str(shared.digest)}}
    report = await collect(driver, GcSettings(grace_seconds=3600), evicted=evicted)
    assert [digest for digest, _ in report.blobs] == [alone.digest]
    assert await driver.stat_blob(alone.digest) is None
    assert await driver.stat_blob(shared.digest) is not None  # team/app linked it within the grace period
    assert await driver.is_blob_linked("team/app", shared.digest)
    assert not await driver.is_blob_linked("docker.io/library/a", shared.digest)
    # Without the eviction, the grace period keeps young content.
    young = await upload(driver, "docker.io/library/b", b"young")
    await collect(driver, GcSettings(grace_seconds=3600))
    assert await driver.stat_blob(young.digest) is not None
