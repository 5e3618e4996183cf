"""Driver contract: repository links, tags, referrers, locks, cache records, whole-repository
removal, and that each mutation is atomic as seen from another process (run once per
flavour, see flavours.py)."""

import asyncio
import json

import pytest

from storage import RepositoryBusy, UploadNotFound
from storage.fsck import fsck
from storage.manifests import put_manifest

from .helpers import MEDIA_TYPE, digest_of, push_image, put, read_all, upload

INDEX = "application/vnd.oci.image.index.v1+json"


async def test_links_tags_and_repositories(driver, other):
    d = digest_of(b"m")
    await driver.put_small_blob(b"m", d)
    await driver.link_manifest("x/y", d, MEDIA_TYPE)
    assert (await other.get_manifest_link("x/y", d)).media_type == MEDIA_TYPE
    assert await other.get_manifest_link("x", d) is None
    await driver.set_tag("x/y", "b", d)
    await driver.set_tag("x/y", "a", d)
    assert await other.list_tags("x/y") == ["a", "b"]
    assert await other.resolve_tag("x/y", "a") == d
    assert await other.resolve_tag("x/y", "c") is None
    assert await other.delete_tag("x/y", "a")
    assert not await driver.delete_tag("x/y", "a")
    assert await driver.resolve_tag("x/y", "a") is None
    assert [link.digest for link in await other.list_manifests("x/y")] == [d]
    await upload(driver, "x", b"blob")
    assert await other.list_repositories() == ["x", "x/y"]
    assert await other.repositories_linking_blob(digest_of(b"blob")) == ["x"]
    assert await other.repository_exists("x/y") and not await other.repository_exists("y")
    assert not await other.repository_exists("x/y/z")
    assert await other.unlink_manifest("x/y", d)
    assert not await driver.unlink_manifest("x/y", d)
    assert await driver.get_manifest_link("x/y", d) is None
    assert await driver.list_tags("nothing") == [] and await driver.list_manifests("nothing") == []


async def test_a_repository_exists_with_one_link_of_either_kind(driver):
    await driver.link_manifest("only/manifest", digest_of(b"m"), MEDIA_TYPE)
    await driver.put_small_blob(b"b", digest_of(b"b"))
    await driver.link_blob("only/blob", digest_of(b"b"))
    assert await driver.list_repositories() == ["only/blob", "only/manifest"]
    assert "only" not in await driver.list_repositories()


async def test_relinking_a_manifest_replaces_its_media_type(driver, other):
    d = digest_of(b"m")
    await driver.link_manifest("a", d, MEDIA_TYPE)
    await other.link_manifest("a", d, INDEX)
    assert (await driver.get_manifest_link("a", d)).media_type == INDEX
    assert [(link.digest, link.media_type) for link in await driver.list_manifests("a")] == [(d, INDEX)]


async def test_blob_links(driver, other):
    one, two = digest_of(b"one"), digest_of(b"two")
    await driver.put_small_blob(b"one", one)
    await driver.put_small_blob(b"two", two)
    await driver.link_blob("a", one)
    await other.link_blob("a", one)
    await other.link_blob("a", two)
    await driver.link_blob("b", one)
    assert (await other.stat_linked_blob("a", one)).size == 3
    assert await other.stat_linked_blob("c", one) is None
    assert sorted(link.digest for link in await other.list_blob_links("a")) == sorted([one, two])
    assert await driver.repositories_linking_blob(one) == ["a", "b"]
    assert await other.unlink_blob("a", one)
    assert not await driver.unlink_blob("a", one)
    assert not await driver.is_blob_linked("a", one) and await driver.is_blob_linked("b", one)
    assert [link.digest for link in await driver.list_blob_links("a")] == [two]
    assert await driver.list_blob_links("nothing") == []


async def test_retagging_moves_the_tag(driver, other):
    first, second = digest_of(b"1"), digest_of(b"2")
    await driver.set_tag("a", "latest", first)
    await other.set_tag("a", "latest", second)
    assert await driver.resolve_tag("a", "latest") == second
    assert await driver.list_tags("a") == ["latest"]


async def test_referrers(driver, other):
    subject, referrer, later = digest_of(b"s"), digest_of(b"r"), digest_of(b"later")
    descriptor = {"mediaType": MEDIA_TYPE, "digest": str(referrer), "size": 1, "artifactType": "x/y",
                  "annotations": {"k": "v"}}
    await driver.add_referrer("a", subject, descriptor)
    await other.add_referrer("a", subject, {"mediaType": MEDIA_TYPE, "digest": str(later), "size": 2})
    assert await other.list_referrers("a", subject) == sorted([referrer, later])
    assert await other.read_referrer("a", subject, referrer) == descriptor
    assert await other.list_referrer_subjects("a") == [subject]
    assert await other.list_referrers("b", subject) == []
    assert await other.list_referrer_subjects("b") == []
    assert await other.list_referrers("a", referrer) == []
    await driver.remove_referrer("a", subject, referrer)
    await driver.remove_referrer("a", subject, referrer)  # gone already: no error
    assert await other.list_referrers("a", subject) == [later]
    assert await other.read_referrer("a", subject, referrer) is None
    await other.remove_referrer("a", subject, later)
    assert await driver.list_referrer_subjects("a") == []


async def test_repository_lock_excludes_other_holders(driver, other, flavour, monkeypatch):
    order = []

    async def hold(d, name, seconds):
        async with d.repository_lock("a"):
            order.append(f"{name} in")
            await asyncio.sleep(seconds)
            order.append(f"{name} out")

    await asyncio.gather(hold(driver, "first", 0.2), hold(other, "second", 0))
    assert order in (["first in", "first out", "second in", "second out"],
                     ["second in", "second out", "first in", "first out"])
    async with driver.repository_lock("a"), other.repository_lock("b"):
        pass  # another repository's lock is another lock
    flavour.shorten_lock_waits(monkeypatch, 0.05)
    async with driver.repository_lock("a"):
        with pytest.raises(RepositoryBusy):
            async with other.repository_lock("a"):
                pass
    async with other.repository_lock("a"):  # released, also after the failed attempt
        pass


async def test_cache_records(driver, other):
    assert await driver.read_cache_record("docker.io/library/a", "origin") is None
    assert await driver.list_cache_records("docker.io/library/a") == {}
    await driver.write_cache_record("docker.io/library/a", "origin", b"https://registry-1.docker.io")
    await other.write_cache_record("docker.io/library/a", "tag-latest.json", b"{}")
    await other.write_cache_record("docker.io/library/b", "origin", b"elsewhere")
    assert await other.read_cache_record("docker.io/library/a", "origin") == b"https://registry-1.docker.io"
    await other.write_cache_record("docker.io/library/a", "origin", b"replaced")
    assert await driver.list_cache_records("docker.io/library/a") == {"origin": b"replaced", "tag-latest.json": b"{}"}
    await driver.delete_cache_record("docker.io/library/a", "origin")
    await driver.delete_cache_record("docker.io/library/a", "origin")  # gone already: no error
    assert await other.list_cache_records("docker.io/library/a") == {"tag-latest.json": b"{}"}
    assert await other.read_cache_record("docker.io/library/b", "origin") == b"elsewhere"


async def watch_while(work, check, *, rounds: int = 3) -> int:
    """Run `check` over and over (at least `rounds` times) until `work` is done; how often."""
    task = asyncio.create_task(work)
    count = 0
    while not task.done() or count < rounds:
        await check()
        count += 1
        await asyncio.sleep(0)
    await task
    return count


async def test_each_write_is_seen_whole_or_not_at_all(driver, other):
    """Another process reading while a tag, a manifest link, a referrer entry, a cache record
    and small blobs are (re)written sees the old value or the new one, never none or a torn one."""
    first, second = digest_of(b"first"), digest_of(b"second")
    big = {name: name.encode() * (1 << 19) for name in ("a", "b")}  # two 512 KiB records
    descriptor = {name: {"mediaType": MEDIA_TYPE, "digest": str(first), "size": 1, "annotations": {"n": name * 4096}}
                  for name in ("a", "b")}
    await driver.set_tag("r", "t", first)
    await driver.link_manifest("r", first, MEDIA_TYPE)
    await driver.add_referrer("r", second, descriptor["a"])
    await driver.write_cache_record("r", "record", big["a"])
    blobs = {f"{n}".encode() * 20_000 for n in range(20)}

    async def write():
        for n in range(20):
            await driver.set_tag("r", "t", (first, second)[n % 2])
            await driver.link_manifest("r", first, (MEDIA_TYPE, INDEX)[n % 2])
            await driver.add_referrer("r", second, descriptor["ab"[n % 2]])
            await driver.write_cache_record("r", "record", big["ab"[n % 2]])
            data = f"{n}".encode() * 20_000
            await driver.put_small_blob(data, digest_of(data))

    async def check():
        assert await other.resolve_tag("r", "t") in (first, second)
        assert (await other.get_manifest_link("r", first)).media_type in (MEDIA_TYPE, INDEX)
        assert await other.read_referrer("r", second, first) in descriptor.values()
        record = await other.read_cache_record("r", "record")
        assert any(record == value for value in big.values()), f"a torn record of {len(record or b'')} bytes"
        async for blob in other.iter_blobs():
            data = await other.read_small_blob(blob.digest, 1 << 20)
            assert any(data == value for value in blobs), f"a torn blob of {len(data)} bytes"

    assert await watch_while(write(), check) >= 3


async def test_concurrent_writers_in_two_processes(driver, other):
    """Both finish; the store holds one of the two values, whole."""
    values = [digest_of(bytes([n])) for n in range(20)]
    for n, digest in enumerate(values):
        await driver.put_small_blob(bytes([n]), digest)
    await asyncio.gather(*[(driver, other)[n % 2].set_tag("r", "t", values[n]) for n in range(20)],
                         *[(driver, other)[n % 2].link_blob("r", values[n]) for n in range(20)])
    assert await driver.resolve_tag("r", "t") in values
    assert sorted(link.digest for link in await other.list_blob_links("r")) == sorted(values)


async def build_repository(driver, name: str = "app"):
    """Tags, an index, a referrer, blob links, an upload session and a cache record."""
    image, manifest = await push_image(driver, name, "v1", b"{}", f"{name} layer".encode())
    await driver.set_tag(name, "v2", image)
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MEDIA_TYPE, "digest": str(image), "size": len(manifest)}]}).encode()
    index_digest, _ = await put_manifest(driver, name, index, INDEX, tags=("multi",))
    signature, _ = await push_image(driver, name, "sig", b'{"sig":1}', subject={
        "mediaType": MEDIA_TYPE, "digest": str(image), "size": len(manifest)})
    for n in range(30):
        await driver.set_tag(name, f"t{n}", signature if n % 2 else index_digest)
    session = await driver.create_upload(name)
    await driver.write_cache_record(name, "record", b"x")
    return image, session


async def test_delete_repository(driver, other):
    image, session = await build_repository(driver, "app")
    await build_repository(driver, "app/sub")
    blobs = {blob.digest async for blob in driver.iter_blobs()}
    assert not await driver.delete_repository("nothing")
    async with other.repository_lock("app"):
        assert await other.delete_repository("app")
    assert await driver.list_repositories() == ["app/sub"]  # the nested one stays
    assert not await driver.repository_exists("app")
    for listing in (driver.list_tags("app"), driver.list_manifests("app"), driver.list_blob_links("app"),
                    driver.list_referrers("app", image), driver.list_referrer_subjects("app")):
        assert await listing == []
    assert await driver.list_cache_records("app") == {}
    with pytest.raises(UploadNotFound):
        await driver.get_upload(session.uuid)
    assert {blob.digest async for blob in driver.iter_blobs()} == blobs  # for the collection
    assert len(await driver.list_tags("app/sub")) == 34
    assert (await fsck(driver)).ok
    async with driver.repository_lock("app/sub"):
        assert await driver.delete_repository("app/sub")
    assert await other.list_repositories() == []


async def test_delete_repository_keeps_the_store_consistent_at_every_moment(driver, other):
    """Watched from another process, the removal goes tags, referrer entries, manifests, blob
    links: each reading below goes the other way, so a step out of order would show as a tag
    or referrer entry naming a missing manifest, or a manifest whose blobs are unlinked."""
    image, _ = await build_repository(driver)
    referenced = {}  # manifest -> the blobs it names
    for link in await driver.list_manifests("app"):
        document = json.loads(await driver.read_small_blob(link.digest, 1 << 20))
        referenced[link.digest] = {d["digest"] for d in [document.get("config"), *document.get("layers", [])] if d}
    all_referrers = await driver.list_referrers("app", image)
    assert all_referrers
    seen = []

    async def check():
        links = {str(link.digest) for link in await other.list_blob_links("app")}
        manifests = {link.digest for link in await other.list_manifests("app")}
        referrers = await other.list_referrers("app", image)
        tags = {tag: await other.resolve_tag("app", tag) for tag in await other.list_tags("app")}
        tags = {tag: digest for tag, digest in tags.items() if digest is not None}
        for digest in manifests:
            assert referenced[digest] <= links, "a manifest outlived its blob links"
        assert set(referrers) <= manifests, "a referrer entry outlived its manifest"
        assert set(tags.values()) <= manifests, "a tag outlived its manifest"
        if tags:
            assert referrers == all_referrers, "referrer entries went before the tags"
        seen.append((len(tags), len(referrers), len(manifests), len(links)))

    async def remove():
        async with driver.repository_lock("app"):
            assert await driver.delete_repository("app")

    await check()
    assert seen == [(34, 1, 3, 3)]  # tags, referrers, manifests, blob links
    await watch_while(remove(), check)
    assert seen[-1] == (0, 0, 0, 0)



async def test_a_blob_read_from_another_process_while_it_is_stored(driver, other):
    """stat_blob and read_blob see no blob, or all of it."""
    data = bytes(range(256)) * 16_384  # 4 MiB
    digest = digest_of(data)

    async def check():
        blob = await other.stat_blob(digest)
        if blob is not None:
            assert blob.size == len(data)
            assert await read_all(other, digest) == data

    assert await watch_while(put(driver, "a", data), check) >= 3


async def test_repositories_are_found_in_name_order_from_any_name(driver):
    # Sorted names are not a depth-first order: `a-b` and `a.b` sort between `a` and `a/c`.
    names = ["a", "a/c", "a-b", "a.b", "a/c/d", "a__b", "b", "b/a-x", "b/a/y", "c/only/deep"]
    for name in names:
        await upload(driver, name, b"x")
    assert await driver.list_repositories() == sorted(names)
    assert [name async for name in driver.iter_repositories()] == sorted(names)
    for after in ["", "a", "a-b", "a/c", "a/c/d", "a/b", "b/a", "b/a-x", "c", "c/only", "zzz"]:
        assert [name async for name in driver.iter_repositories(after or None)] == \
            [name for name in sorted(names) if name > after], after


async def test_stamp_tags_reads_only_the_tags_asked_for(driver, other):
    """What the web UI shows of one page of tags: digest and when each was last written."""
    import time
    before = time.time() - 1
    first, second = digest_of(b"m1"), digest_of(b"m2")
    for data, digest in ((b"m1", first), (b"m2", second)):
        await driver.put_small_blob(data, digest)
        await driver.link_manifest("team/app", digest, MEDIA_TYPE)
    await driver.set_tag("team/app", "a", first)
    await driver.set_tag("team/app", "b", second)
    await driver.set_tag("team/app", "c", second)
    stamps = await other.stamp_tags("team/app", ["a", "c", "missing", "../escape"])
    assert {tag: stamp.digest for tag, stamp in stamps.items()} == {"a": first, "c": second}
    many = await other.stamp_tags("team/app", ["a", "c", "d", "e", "f", "g", "h"])  # a driver may list instead
    assert many == stamps
    assert all(before <= stamp.mtime <= time.time() + 1 for stamp in stamps.values())
    assert await other.stamp_tags("nothing", ["a"]) == {}
