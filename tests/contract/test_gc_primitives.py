"""Driver contract: the primitives garbage collection is built on (the reference guard and
its journal, one collection at a time, snapshots, batch deletes, empty repositories), run
once per flavour (see flavours.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from storage import RepositoryBusy

from .helpers import MEDIA_TYPE, digest_of, entered_within, upload


async def test_linking_again_makes_the_link_young(driver, other, flavour):
    blob = await upload(driver, "a", b"content")
    linked = (await driver.snapshot_repository("a")).layers[blob.digest]
    await asyncio.sleep(flavour.clock_step)
    again = time.time()
    await asyncio.sleep(flavour.clock_step)
    await other.link_blob("a", blob.digest)  # a mount, or a commit of the same content
    assert (await driver.snapshot_repository("a")).layers[blob.digest] > max(linked, again)
    await other.link_blob("b", blob.digest)
    assert (await driver.snapshot_repository("b")).layers.keys() == {blob.digest}
    links = {link.digest: link.mtime for link in await driver.list_blob_links("b")}
    assert links[blob.digest] > again


async def test_a_blob_linked_again_within_the_grace_period_is_kept(driver, other, flavour):
    """However old the blob itself: the time that counts is the youngest link's (a driver
    may also refresh the blob's own time, as the filesystem's does)."""
    from storage.gc import GcSettings, collect
    relinked, mounted, forgotten = [await upload(driver, repo, repo.encode()) for repo in ("a", "b", "d")]
    await asyncio.sleep(flavour.clock_step)
    cutoff = time.time()
    await asyncio.sleep(flavour.clock_step)
    await other.link_blob("a", relinked.digest)  # committed again
    await other.link_blob("c", mounted.digest)  # mounted into another repository
    report = await collect(other, GcSettings(grace_seconds=3600), now=cutoff + 3600)
    assert report.blobs == [(forgotten.digest, 1)]
    assert sorted(report.layer_links) == [("b", mounted.digest), ("d", forgotten.digest)]
    assert await driver.is_blob_linked("a", relinked.digest) and await driver.is_blob_linked("c", mounted.digest)
    assert await driver.stat_blob(relinked.digest) and await driver.stat_blob(mounted.digest)


async def test_one_collection_at_a_time_across_processes(driver, other):
    assert await driver.last_collection() is None
    before = time.time()
    async with driver.collection() as first:
        assert first is not None
        async with other.collection() as second:
            assert second is None
        async with driver.collection() as third:  # the same process, too
            assert third is None
    async with other.collection() as again:
        assert again is not None
    assert before - 1 <= await driver.last_collection() <= time.time() + 1


async def test_references_are_journaled_only_while_a_collection_runs(driver, other):
    a, b, c = (digest_of(x) for x in (b"a", b"b", b"c"))
    async with driver.reference_guard():
        await driver.note_references(blobs=[a])  # no collection: nothing to note
    async with other.collection() as run:
        assert await run.read_journal() == (set(), set())
        async with driver.reference_guard():
            await driver.note_references(manifests=[a], blobs=[b, c])
        async with other.reference_guard():
            await other.note_references(manifests=[c])
        assert await run.read_journal() == ({a, c}, {b, c})
        assert await run.read_journal() == (set(), set())  # only what is new
        async with driver.reference_guard():
            await driver.note_references(blobs=[a])
        async with run.exclusive():
            assert await run.read_journal() == (set(), {a})
    async with other.collection() as run:  # a new collection starts with an empty journal
        assert await run.read_journal() == (set(), set())


async def test_the_reference_guard_is_shared(driver, other):
    async with driver.reference_guard():
        assert await entered_within(other.reference_guard(), 5)
        assert await entered_within(driver.reference_guard(), 5)  # another operation of this process


async def test_the_exclusive_guard_waits_for_references_in_progress(driver, other):
    async with other.collection() as run:
        async with driver.reference_guard():
            assert not await entered_within(run.exclusive(), 0.3)
        assert await entered_within(run.exclusive(), 5)
        async with run.exclusive():
            assert not await entered_within(driver.reference_guard(), 0.3)
            assert not await entered_within(other.reference_guard(), 0.3)
        assert await entered_within(driver.reference_guard(), 5)


async def test_references_do_not_starve_a_waiting_collection(driver, other):
    """While a collection waits for the guard, newcomers wait behind it."""
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


async def test_guard_times_out_as_busy(driver, other, flavour, monkeypatch):
    flavour.shorten_lock_waits(monkeypatch, 0.2)
    async with other.collection() as run, run.exclusive():
        with pytest.raises(RepositoryBusy):
            async with driver.reference_guard():
                pass
    async with driver.reference_guard():  # and is had once the collection lets go
        pass


async def test_snapshot_and_blob_listing(driver, other):
    before = time.time() - 1
    blob = await upload(driver, "team/app", b"layer")
    manifest = digest_of(b"manifest")
    await driver.put_small_blob(b"manifest", manifest)
    await driver.link_manifest("team/app", manifest, MEDIA_TYPE)
    await driver.set_tag("team/app", "v1", manifest)
    snapshot = await other.snapshot_repository("team/app")
    assert snapshot.name == "team/app"
    assert snapshot.layers.keys() == {blob.digest} and snapshot.revisions.keys() == {manifest}
    assert snapshot.tags.keys() == {"v1"} and snapshot.tags["v1"].digest == manifest
    after = time.time() + 1
    for stamp in (snapshot.layers[blob.digest], snapshot.revisions[manifest], snapshot.tags["v1"].mtime):
        assert before <= stamp <= after
    listed = {b.digest: (b.size, before <= b.mtime <= after) async for b in other.iter_blobs()}
    assert listed == {blob.digest: (5, True), manifest: (8, True)}
    empty = await other.snapshot_repository("nothing")
    assert (empty.tags, empty.revisions, empty.layers) == ({}, {}, {})


async def test_batch_deletes(driver, other):
    one, two = await upload(driver, "a", b"one"), await upload(driver, "a", b"two")
    await driver.link_blob("b", one.digest)
    async with other.collection() as run, run.exclusive():
        await other.unlink_blobs([("a", one.digest), ("b", one.digest), ("a", digest_of(b"never linked"))])
        await other.delete_blobs([one.digest, digest_of(b"never stored")])
    assert await driver.stat_blob(one.digest) is None and await driver.stat_blob(two.digest) is not None
    assert not await driver.is_blob_linked("a", one.digest) and await driver.is_blob_linked("a", two.digest)
    assert not await driver.is_blob_linked("b", one.digest)
    assert [b.digest async for b in driver.iter_blobs()] == [two.digest]


async def test_only_empty_repositories_are_removed(driver, other):
    blob = await upload(driver, "team", b"x")
    await upload(driver, "team/app", b"y")
    manifest = digest_of(b"m")
    await driver.link_manifest("tagged", manifest, MEDIA_TYPE)
    await driver.set_tag("tagged", "v1", manifest)
    await driver.add_referrer("referred", manifest, {"mediaType": MEDIA_TYPE, "digest": str(manifest), "size": 1})
    await driver.link_blob("referred", blob.digest)
    async with other.collection() as run, run.exclusive():
        assert not await other.remove_repository_if_empty("team")
        await other.unlink_blob("team", blob.digest)
        assert await other.remove_repository_if_empty("team")
        assert await driver.list_repositories() == ["referred", "tagged", "team/app"]  # the nested one stays
        await other.unlink_manifest("tagged", manifest)
        assert not await other.remove_repository_if_empty("tagged")  # a tag left
        await other.delete_tag("tagged", "v1")
        assert await other.remove_repository_if_empty("tagged")
        await other.unlink_blob("referred", blob.digest)
        assert not await other.remove_repository_if_empty("referred")  # a referrer entry left
        await other.remove_referrer("referred", manifest, manifest)
        assert await other.remove_repository_if_empty("referred")
        await driver.unlink_blob("team/app", digest_of(b"y"))
        assert await other.remove_repository_if_empty("team/app")
    assert await driver.list_repositories() == []
    assert not await driver.repository_exists("team/app")


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
