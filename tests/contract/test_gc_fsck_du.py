"""Driver contract: garbage collection (storage/gc.py), fsck (storage/fsck.py) and `kura du`'s
measure (storage/usage.py) work through the interface alone, on every flavour (flavours.py).
Time is moved with collect's `now`, never by ageing what the driver stored."""

from __future__ import annotations

import json
import time

from storage.fsck import fsck
from storage.gc import GcSettings, collect
from storage.manifests import READ_LIMIT, delete_manifest, put_manifest
from storage.usage import measure

from .helpers import MEDIA_TYPE, digest_of, push_image, put

HOUR = 3600
INDEX = "application/vnd.oci.image.index.v1+json"
SETTINGS = GcSettings(grace_seconds=HOUR, upload_expiry_seconds=HOUR)


async def stored(driver) -> set:
    return {blob.digest async for blob in driver.iter_blobs()}


async def build_store(driver):
    """app:v1 kept; app:v2 deleted; `old` deleted as a whole; a blob linked into app that
    nothing references; a repository holding only such a blob; an upload session."""
    kept, kept_manifest = await push_image(driver, "app", "v1", b'{"k":1}', b"kept layer", b"shared layer")
    gone, gone_manifest = await push_image(driver, "app", "v2", b'{"g":1}', b"gone layer", b"shared layer")
    await delete_manifest(driver, "app", gone, READ_LIMIT)
    old, old_manifest = await push_image(driver, "old", "v1", b'{"o":1}', b"old layer")
    async with driver.repository_lock("old"):
        await driver.delete_repository("old")
    stray = await put(driver, "app", b"never referenced")
    lonely = await put(driver, "lonely", b"only a link")
    session = await driver.create_upload("app")
    doomed = {gone, digest_of(b'{"g":1}'), digest_of(b"gone layer"), old, digest_of(b'{"o":1}'),
              digest_of(b"old layer"), stray, lonely}
    return kept, doomed, session


async def test_a_collection_through_the_interface(driver, other):
    kept, doomed, session = await build_store(driver)
    everything = await stored(driver)
    young = await collect(other, SETTINGS)  # all of it is within the grace period
    assert (young.blobs, young.layer_links, young.repositories) == ([], [], [])
    assert await stored(driver) == everything

    later = time.time() + 2 * HOUR
    dry = await collect(other, SETTINGS, dry_run=True, now=later)
    assert {digest for digest, _ in dry.blobs} == doomed
    assert await stored(driver) == everything  # a dry run changes nothing
    assert await driver.get_upload(session.uuid)

    report = await collect(other, SETTINGS, now=later)
    assert {digest for digest, _ in report.blobs} == doomed
    assert report.bytes_freed == dry.bytes_freed > 0
    assert sorted((name, str(d)) for name, d in report.layer_links) == sorted(
        [("app", str(digest_of(b'{"g":1}'))), ("app", str(digest_of(b"gone layer"))),
         ("app", str(digest_of(b"never referenced"))), ("lonely", str(digest_of(b"only a link")))])
    assert report.repositories == ["lonely"] and report.uploads == 1
    assert await stored(driver) == everything - doomed
    assert await driver.list_repositories() == ["app"]
    assert await driver.resolve_tag("app", "v1") == kept
    assert (await fsck(driver)).ok
    again = await collect(driver, SETTINGS, now=later)
    assert (again.blobs, again.layer_links, again.repositories) == ([], [], [])


async def test_untagged_manifests_go_but_not_what_a_kept_one_reaches(driver, other):
    child, child_manifest = await push_image(driver, "app", None, b'{"c":1}', b"child layer")
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MEDIA_TYPE, "digest": str(child), "size": len(child_manifest)}]}).encode()
    index_digest, _ = await put_manifest(driver, "app", index, INDEX, tags=("multi",))
    signature, _ = await push_image(driver, "app", None, b'{"s":1}', subject={
        "mediaType": MEDIA_TYPE, "digest": str(child), "size": len(child_manifest)})
    untagged, _ = await push_image(driver, "app", None, b'{"u":1}', b"untagged layer")
    settings = GcSettings(grace_seconds=HOUR, delete_untagged=True)
    report = await collect(other, settings, now=time.time() + 2 * HOUR)
    assert report.manifests == [("app", untagged)]
    assert {digest for digest, _ in report.blobs} == {untagged, digest_of(b'{"u":1}'), digest_of(b"untagged layer")}
    for digest in (child, index_digest, signature):
        assert await driver.get_manifest_link("app", digest) is not None
    assert await driver.list_referrers("app", child) == [signature]
    assert (await fsck(driver)).ok


async def test_fsck_finds_a_clean_store_clean(driver, other):
    await build_store(driver)
    child, child_manifest = await push_image(driver, "team/app", "v1", b'{"c":1}', b"child layer")
    await push_image(driver, "team/app", "sig", b'{"s":1}', subject={
        "mediaType": MEDIA_TYPE, "digest": str(child), "size": len(child_manifest)})
    report = await fsck(other)
    assert report.ok, report.problems
    assert (report.repositories, report.manifests, report.tags) == (3, 3, 3)
    assert report.blobs == len(await stored(driver))
    assert "1 upload session(s) in progress or abandoned" in report.notes


async def test_fsck_reports_damage_made_through_the_interface(driver, other):
    image, _ = await push_image(driver, "app", "v1", b'{"a":1}', b"layer")
    signature, _ = await push_image(driver, "app", "sig", b'{"s":1}', b"sig layer", subject={
        "mediaType": MEDIA_TYPE, "digest": str(image), "size": 1})
    lie = digest_of(b"what the digest says")
    await driver.put_small_blob(b"something else", lie)  # the caller computed it wrongly
    async with other.collection() as run, run.exclusive():
        await other.delete_blobs([digest_of(b"layer")])  # still linked and referenced
    await driver.unlink_manifest("app", signature)  # its tag and referrer entry stay
    await driver.link_manifest("app", digest_of(b"never stored"), MEDIA_TYPE)
    await driver.put_small_blob(b"{not json", digest_of(b"{not json"))
    await driver.link_manifest("app", digest_of(b"{not json"), MEDIA_TYPE)
    problems = (await fsck(other)).problems
    expected = [
        f"blob {lie} is corrupt: content hashes to {digest_of(b'something else').encoded}",
        f"app: layer link {digest_of(b'layer')} points at a missing blob",
        f"app: manifest {image} references missing blob {digest_of(b'layer')}",
        f"app: tag sig points at missing manifest {signature}",
        f"app: referrer entry {signature} names a missing manifest",
        f"app: manifest {digest_of(b'never stored')} is missing from the blob store",
    ]
    for problem in expected:
        assert problem in problems, (problem, problems)
    unparsable = [p for p in problems if p.startswith(f"app: manifest {digest_of(b'{not json')} does not parse")]
    assert len(unparsable) == 1
    assert len(problems) == len(expected) + 1, problems


async def test_measure_through_the_interface(driver, other):
    base, app, cfg_a, cfg_b = b"B" * 5000, b"A" * 700, b'{"cfg":"a"}', b'{"cfg":"bb"}'
    digest_a, manifest_a = await push_image(driver, "lib/base", "1", cfg_a, base)
    await driver.set_tag("lib/base", "latest", digest_a)
    _, manifest_b = await push_image(driver, "lib/app", "1", cfg_b, base, app)
    await put(driver, "lib/app", b"O" * 33)  # linked, referenced by no manifest
    await put(driver, "lib/gone", b"G" * 11)
    async with driver.repository_lock("lib/gone"):
        await driver.delete_repository("lib/gone")  # its blob stays until a collection

    report = await measure(other)
    rows = {row.name: row for row in report.repositories}
    assert set(rows) == {"lib/base", "lib/app"}
    assert (rows["lib/base"].manifests, rows["lib/base"].tags) == (1, 2)
    assert rows["lib/base"].referenced_bytes == 5000 + len(cfg_a) + len(manifest_a)
    assert rows["lib/base"].exclusive_bytes == len(cfg_a) + len(manifest_a)
    assert rows["lib/app"].referenced_bytes == 5000 + 700 + len(cfg_b) + len(manifest_b) + 33
    assert rows["lib/app"].exclusive_bytes == 700 + len(cfg_b) + len(manifest_b) + 33
    assert report.blobs == 8
    assert report.store_bytes == 5000 + 700 + len(cfg_a) + len(cfg_b) + len(manifest_a) + len(manifest_b) + 33 + 11
    assert (report.reclaimable_blobs, report.reclaimable_bytes) == (2, 33 + 11)
