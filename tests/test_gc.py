"""Garbage collection frees exactly the unreachable set (storage/gc.py).

Each case pushes through the API, ages what should count as old with os.utime, runs one
collection through a second driver on the same store (as `kura gc` beside `kura serve`),
and compares what was removed, in the report and on disk, with what the case expects."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

import pytest

from storage import FilesystemDriver
from storage.fsck import fsck
from storage.gc import GcSettings, RetentionRule, collect
from tests.conftest import OCI_INDEX, OCI_MANIFEST, image_manifest, upload_blob
from tests.support.client import sha256

HOUR = 3600
DAY = 86400
SETTINGS = GcSettings(grace_seconds=HOUR)


@dataclass
class Image:
    digest: str
    config: str
    layers: list[str]
    data: bytes

    @property
    def blobs(self) -> set[str]:
        return {self.digest, self.config, *self.layers}


_counter = iter(range(1 << 30))


async def push(client, repo: str, reference: str, layers=(b"layer",), **extra) -> Image:
    """Push an image whose config is unique; layers as given (shared when equal)."""
    config = json.dumps({"n": next(_counter)}).encode()
    config_digest = await upload_blob(client, repo, config)
    layer_digests = [await upload_blob(client, repo, layer) for layer in layers]
    data = image_manifest(config_digest, len(config), list(zip(layer_digests, map(len, layers))), **extra)
    r = await client.put(f"/v2/{repo}/manifests/{reference}", data=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return Image(r.headers["Docker-Content-Digest"], config_digest, layer_digests, data)


async def push_index(client, repo: str, reference: str, children: list[Image]) -> str:
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": c.digest, "size": len(c.data)} for c in children]}).encode()
    r = await client.put(f"/v2/{repo}/manifests/{reference}", data=data, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201, await r.text()
    return r.headers["Docker-Content-Digest"]


async def push_signature(client, repo: str, subject: Image, signature: bytes = b"sig") -> Image:
    """An artifact manifest whose subject is `subject`, pushed by digest (untagged)."""
    subject_descriptor = {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": len(subject.data)}
    config = b"{}"
    config_digest = await upload_blob(client, repo, config)
    layer = await upload_blob(client, repo, signature)
    data = image_manifest(config_digest, len(config), [(layer, len(signature))],
                          artifactType="application/example.signature", subject=subject_descriptor)
    r = await client.put(f"/v2/{repo}/manifests/{sha256(data)}", data=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return Image(sha256(data), config_digest, [layer], data)


async def delete(client, repo: str, reference: str) -> None:
    r = await client.delete(f"/v2/{repo}/manifests/{reference}")
    assert r.status == 202, await r.text()


def set_age(paths, seconds: float) -> None:
    stamp = time.time() - seconds
    for path in paths:
        os.utime(path, (stamp, stamp))


def age_store(root, seconds: float = 2 * HOUR) -> None:
    """Make everything stored so far older than the grace period."""
    set_age([p for top in ("blobs", "repositories") for p in (root / top).rglob("*") if p.is_file()], seconds)


def blob_path(root, digest: str):
    algorithm, encoded = digest.split(":")
    return root / "blobs" / algorithm / encoded[:2] / encoded


def link_path(root, repo: str, digest: str):
    algorithm, encoded = digest.split(":")
    return root / "repositories" / repo / "_layers" / algorithm / encoded


def stored_blobs(root) -> set[str]:
    return {f"{p.parent.parent.name}:{p.name}" for p in (root / "blobs").rglob("*") if p.is_file()}


def stored_links(root) -> set[tuple[str, str]]:
    found = set()
    for p in (root / "repositories").rglob("_layers/*/*"):
        repo = p.parent.parent.parent.relative_to(root / "repositories").as_posix()
        found.add((repo, f"{p.parent.name}:{p.name}"))
    return found


def stored_revisions(root) -> set[tuple[str, str]]:
    found = set()
    for p in (root / "repositories").rglob("_manifests/revisions/*/*"):
        repo = p.parents[3].relative_to(root / "repositories").as_posix()
        found.add((repo, f"{p.parent.name}:{p.name}"))
    return found


@dataclass
class Expected:
    blobs: set[str] = field(default_factory=set)
    links: set[tuple[str, str]] = field(default_factory=set)
    manifests: set[tuple[str, str]] = field(default_factory=set)
    tags: set[tuple[str, str]] = field(default_factory=set)
    repositories: set[str] = field(default_factory=set)
    settings: GcSettings = SETTINGS


# -- the cases: each builds a store and says what one collection must remove ------------------

async def shared_layers_between_two_images(client, root) -> Expected:
    a = await push(client, "app", "a", layers=[b"only-a", b"shared"])
    b = await push(client, "app", "b", layers=[b"shared", b"only-b"])
    await delete(client, "app", a.digest)
    age_store(root)
    gone = {a.digest, a.config, sha256(b"only-a")}
    assert b.layers[0] == sha256(b"shared")
    return Expected(blobs=gone, links={("app", a.config), ("app", sha256(b"only-a"))})


async def shared_layers_across_repositories(client, root) -> Expected:
    a = await push(client, "one", "v1", layers=[b"shared"])
    await push(client, "two", "v1", layers=[b"shared"])
    await delete(client, "one", a.digest)
    age_store(root)
    # The shared layer stays for `two`; `one` loses its link to it, and is then empty.
    return Expected(blobs={a.digest, a.config}, links={("one", a.config), ("one", sha256(b"shared"))},
                    repositories={"one"})


async def index_and_its_children(client, root) -> Expected:
    amd = await push(client, "multi", "ignored-amd", layers=[b"amd64"])
    arm = await push(client, "multi", "ignored-arm", layers=[b"arm64"])
    for tag in ("ignored-amd", "ignored-arm"):
        r = await client.delete(f"/v2/multi/manifests/{tag}")
        assert r.status == 202
    await push_index(client, "multi", "latest", [amd, arm])
    age_store(root)
    return Expected()  # children are reachable through the index (and as revisions)


async def deleted_index_leaves_its_children(client, root) -> Expected:
    amd = await push(client, "multi", "amd", layers=[b"amd64"])
    arm = await push(client, "multi", "arm", layers=[b"arm64"])
    index = await push_index(client, "multi", "latest", [amd, arm])
    await delete(client, "multi", index)
    age_store(root)
    return Expected(blobs={index})  # the children are still revisions: pullable by digest


async def referrer_and_its_subject(client, root) -> Expected:
    subject = await push(client, "signed", "v1", layers=[b"signed-layer"])
    await push_signature(client, "signed", subject)
    age_store(root)
    return Expected()


async def referrer_keeps_a_deleted_subject(client, root) -> Expected:
    subject = await push(client, "signed", "v1", layers=[b"signed-layer"])
    await push_signature(client, "signed", subject)
    await delete(client, "signed", subject.digest)
    age_store(root)
    return Expected()  # the signature still references its subject (and so what the subject references)


async def referrer_and_subject_both_deleted(client, root) -> Expected:
    subject = await push(client, "signed", "v1", layers=[b"signed-layer"])
    signature = await push_signature(client, "signed", subject)
    await delete(client, "signed", signature.digest)
    await delete(client, "signed", subject.digest)
    age_store(root)
    blobs = subject.blobs | signature.blobs
    return Expected(blobs=blobs, links={("signed", d) for d in blobs - {subject.digest, signature.digest}},
                    repositories={"signed"})


async def overwritten_tag(client, root) -> Expected:
    await push(client, "app", "latest", layers=[b"v1"])
    await push(client, "app", "latest", layers=[b"v2"])
    age_store(root)
    return Expected()  # the first is untagged but still pullable by digest


async def overwritten_tag_with_delete_untagged(client, root) -> Expected:
    v1 = await push(client, "app", "latest", layers=[b"v1", b"common"])
    await push(client, "app", "latest", layers=[b"v2", b"common"])
    age_store(root)
    return Expected(blobs={v1.digest, v1.config, sha256(b"v1")},
                    links={("app", v1.config), ("app", sha256(b"v1"))},
                    manifests={("app", v1.digest)}, settings=replace(SETTINGS, delete_untagged=True))


async def deleted_tag(client, root) -> Expected:
    await push(client, "app", "v1", layers=[b"v1"])
    r = await client.delete("/v2/app/manifests/v1")
    assert r.status == 202
    age_store(root)
    return Expected()


async def deleted_tag_with_delete_untagged(client, root) -> Expected:
    v1 = await push(client, "app", "v1", layers=[b"v1"])
    r = await client.delete("/v2/app/manifests/v1")
    assert r.status == 202
    age_store(root)
    return Expected(blobs=v1.blobs, links={("app", v1.config), ("app", sha256(b"v1"))},
                    manifests={("app", v1.digest)}, repositories={"app"},
                    settings=replace(SETTINGS, delete_untagged=True))


async def unreferenced_blob_outside_grace(client, root) -> Expected:
    await push(client, "app", "v1")
    orphan = await upload_blob(client, "app", b"pushed, never referenced")
    age_store(root)
    return Expected(blobs={orphan}, links={("app", orphan)})


async def unreferenced_blob_inside_grace(client, root) -> Expected:
    await push(client, "app", "v1")
    age_store(root)
    await upload_blob(client, "app", b"pushed a minute ago, manifest not sent yet")
    return Expected()


async def unreferenced_blob_in_grace_by_its_link(client, root) -> Expected:
    """An old blob committed again is young again (the link refreshes it)."""
    await push(client, "app", "v1")
    orphan = await upload_blob(client, "app", b"pushed long ago")
    age_store(root)
    assert await upload_blob(client, "app", b"pushed long ago") == orphan
    return Expected()


async def mount_into_another_repository(client, root) -> Expected:
    src = await push(client, "src", "v1", layers=[b"mounted"])
    layer = src.layers[0]
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={layer}&from=src")
    assert r.status == 201
    await delete(client, "src", src.digest)
    age_store(root)
    # Nobody references the layer any more: its blob and both links go.
    return Expected(blobs=src.blobs, links={("src", src.config), ("src", layer), ("dst", layer)},
                    repositories={"src", "dst"})


async def mount_then_referenced_in_the_other_repository(client, root) -> Expected:
    src = await push(client, "src", "v1", layers=[b"mounted"])
    layer = src.layers[0]
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={layer}&from=src")
    assert r.status == 201
    await push(client, "dst", "v1", layers=[b"mounted"])
    await delete(client, "src", src.digest)
    age_store(root)
    return Expected(blobs={src.digest, src.config}, links={("src", src.config), ("src", layer)},
                    repositories={"src"})


async def nested_repository_keeps_its_parent(client, root) -> Expected:
    parent = await push(client, "team", "v1", layers=[b"p"])
    await push(client, "team/app", "v1", layers=[b"c"])
    await delete(client, "team", parent.digest)
    age_store(root)
    return Expected(blobs=parent.blobs, links={("team", parent.config), ("team", sha256(b"p"))},
                    repositories={"team"})


async def untagged_keeps_index_children(client, root) -> Expected:
    amd = await push(client, "multi", "amd", layers=[b"amd64"])
    arm = await push(client, "multi", "arm", layers=[b"arm64"])
    for tag in ("amd", "arm"):
        r = await client.delete(f"/v2/multi/manifests/{tag}")
        assert r.status == 202
    await push_index(client, "multi", "latest", [amd, arm])
    age_store(root)
    return Expected(settings=replace(SETTINGS, delete_untagged=True))


async def untagged_keeps_a_signature_of_a_tagged_image(client, root) -> Expected:
    subject = await push(client, "signed", "v1")
    await push_signature(client, "signed", subject)
    age_store(root)
    return Expected(settings=replace(SETTINGS, delete_untagged=True))


async def untagged_removes_an_untagged_image_and_its_signature(client, root) -> Expected:
    await push(client, "signed", "keep", layers=[b"kept"])
    subject = await push(client, "signed", "gone", layers=[b"untagged"])
    signature = await push_signature(client, "signed", subject, b"sig-of-untagged")
    r = await client.delete("/v2/signed/manifests/gone")
    assert r.status == 202
    age_store(root)
    blobs = {subject.digest, subject.config, sha256(b"untagged"), signature.digest, sha256(b"sig-of-untagged"),
             sha256(b"{}")}
    return Expected(blobs=blobs, links={("signed", d) for d in blobs - {subject.digest, signature.digest}},
                    manifests={("signed", subject.digest), ("signed", signature.digest)},
                    settings=replace(SETTINGS, delete_untagged=True))


async def untagged_keeps_a_young_signature_and_its_subject(client, root) -> Expected:
    subject = await push(client, "signed", "gone", layers=[b"untagged"])
    r = await client.delete("/v2/signed/manifests/gone")
    assert r.status == 202
    age_store(root)
    await push_signature(client, "signed", subject)  # pushed just now
    return Expected(settings=replace(SETTINGS, delete_untagged=True))


async def untagged_keeps_young_manifests(client, root) -> Expected:
    await push(client, "app", "latest", layers=[b"v1"])
    await push(client, "app", "latest", layers=[b"v2"])  # v1 untagged just now: within the grace period
    return Expected(settings=replace(SETTINGS, delete_untagged=True))


async def retention_keep_last(client, root) -> Expected:
    images = [await push(client, "app", f"v{n}", layers=[b"common"]) for n in range(4)]
    age_store(root)
    for n in range(4):  # v0 oldest ... v3 newest
        set_age([root / "repositories/app/_manifests/tags" / f"v{n}"], (10 - n) * DAY)
    rule = RetentionRule(repositories=("app",), keep_last=2)
    gone = {images[0].digest, images[0].config, images[1].digest, images[1].config}
    return Expected(blobs=gone, links={("app", images[0].config), ("app", images[1].config)},
                    tags={("app", "v0"), ("app", "v1")},
                    manifests={("app", images[0].digest), ("app", images[1].digest)},
                    settings=replace(SETTINGS, delete_untagged=True, retention=(rule,)))


async def retention_keep_last_without_delete_untagged(client, root) -> Expected:
    for n in range(3):
        await push(client, "app", f"v{n}")
        set_age([root / "repositories/app/_manifests/tags" / f"v{n}"], (10 - n) * DAY)
    rule = RetentionRule(repositories=("app",), keep_last=1)
    # Only the tags go: the manifests stay, pullable by digest.
    return Expected(tags={("app", "v0"), ("app", "v1")}, settings=replace(SETTINGS, retention=(rule,)))


async def retention_keep_tags_and_older_than(client, root) -> Expected:
    for tag, days in (("v1.0", 40), ("v1.1", 10), ("nightly-1", 40), ("nightly-2", 10), ("release", 400)):
        await push(client, "team/app", tag)
        set_age([root / "repositories/team/app/_manifests/tags" / tag], days * DAY)
    await push(client, "team/app/sub", "nightly-old")  # `team/*` does not match it
    set_age([root / "repositories/team/app/sub/_manifests/tags/nightly-old"], 400 * DAY)
    rule = RetentionRule(repositories=("team/*",), keep_tags=r"v\d+\.\d+|release", older_than_days=30)
    return Expected(tags={("team/app", "nightly-1")}, settings=replace(SETTINGS, retention=(rule,)))


async def retention_rules_must_all_agree(client, root) -> Expected:
    for n in range(3):
        await push(client, "app", f"v{n}")
        set_age([root / "repositories/app/_manifests/tags" / f"v{n}"], (100 - 30 * n) * DAY)  # 100, 70, 40 days
    keep_one = RetentionRule(repositories=("**",), keep_last=1)  # would remove v0, v1
    older = RetentionRule(repositories=("app",), older_than_days=80)  # would remove v0
    return Expected(tags={("app", "v0")}, settings=replace(SETTINGS, retention=(keep_one, older)))


async def unreadable_manifest_keeps_its_repositorys_blobs(client, root) -> Expected:
    """A linked manifest that no longer reads (damage fsck reports) might need any blob its
    repository links: those stay, and its untagged manifests are not judged. Other
    repositories are collected as usual."""
    broken = await push(client, "broken", "v1", layers=[b"needed by the broken one"])
    untagged = await push(client, "broken", "v2", layers=[b"untagged"])
    r = await client.delete("/v2/broken/manifests/v2")
    assert r.status == 202
    other = await push(client, "other", "v1", layers=[b"other"])
    await delete(client, "other", other.digest)
    blob_path(root, broken.digest).write_bytes(b"{not json")
    age_store(root)
    assert untagged.digest
    return Expected(blobs=other.blobs, links={("other", other.config), ("other", sha256(b"other"))},
                    repositories={"other"}, settings=replace(SETTINGS, delete_untagged=True))


CASES = [unreadable_manifest_keeps_its_repositorys_blobs, shared_layers_between_two_images, shared_layers_across_repositories, index_and_its_children,
         deleted_index_leaves_its_children, referrer_and_its_subject, referrer_keeps_a_deleted_subject,
         referrer_and_subject_both_deleted, overwritten_tag, overwritten_tag_with_delete_untagged, deleted_tag,
         deleted_tag_with_delete_untagged, unreferenced_blob_outside_grace, unreferenced_blob_inside_grace,
         unreferenced_blob_in_grace_by_its_link, mount_into_another_repository,
         mount_then_referenced_in_the_other_repository, nested_repository_keeps_its_parent,
         untagged_keeps_index_children, untagged_keeps_a_signature_of_a_tagged_image,
         untagged_removes_an_untagged_image_and_its_signature, untagged_keeps_a_young_signature_and_its_subject,
         untagged_keeps_young_manifests, retention_keep_last, retention_keep_last_without_delete_untagged,
         retention_keep_tags_and_older_than, retention_rules_must_all_agree]


def removed(report) -> Expected:
    return Expected(blobs={str(d) for d, _ in report.blobs},
                    links={(name, str(d)) for name, d in report.layer_links},
                    manifests={(name, str(d)) for name, d in report.manifests},
                    tags=set(report.tags), repositories=set(report.repositories))


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_collection_removes_exactly_the_unreachable(client, config, case):
    root = config.root
    expected = await case(client, root)
    blobs, links, revisions = stored_blobs(root), stored_links(root), stored_revisions(root)
    catalog = set((await (await client.get("/v2/_catalog")).json())["repositories"])
    sizes = {d: blob_path(root, d).stat().st_size for d in blobs}

    dry = await collect(FilesystemDriver(root), expected.settings, dry_run=True)
    assert (stored_blobs(root), stored_links(root), stored_revisions(root)) == (blobs, links, revisions)
    report = await collect(FilesystemDriver(root), expected.settings)

    got = removed(report)
    got.settings = expected.settings
    assert got == expected
    assert removed(dry) == removed(report)  # a dry run says exactly what a collection would do
    assert report.bytes_freed == dry.bytes_freed == sum(sizes[d] for d in expected.blobs)
    assert stored_blobs(root) == blobs - expected.blobs
    assert stored_links(root) == links - expected.links
    assert stored_revisions(root) == revisions - expected.manifests
    after = set((await (await client.get("/v2/_catalog")).json())["repositories"])
    assert after == catalog - expected.repositories
    check = await fsck(FilesystemDriver(root))
    if case is unreadable_manifest_keeps_its_repositorys_blobs:  # only the planted damage
        assert len(check.problems) == 2 and all(("corrupt" in p or "does not parse" in p) for p in check.problems)
    else:
        assert check.ok, check.problems
    # What is left is still served, byte for byte.
    for name, digest in revisions - expected.manifests:
        r = await client.get(f"/v2/{name}/manifests/{digest}")
        assert r.status == 200
        if name == "broken":
            continue
        document = json.loads(await r.read())
        for descriptor in [document["config"], *document["layers"]] if "config" in document else []:
            blob = await client.get(f"/v2/{name}/blobs/{descriptor['digest']}")
            assert blob.status == 200 and sha256(await blob.read()) == descriptor["digest"]
    # A second collection finds nothing more to do.
    again = removed(await collect(FilesystemDriver(root), expected.settings))
    assert (again.blobs, again.links, again.manifests, again.tags, again.repositories) == (set(),) * 5


def tree(root) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if "locks" not in p.parts}


async def test_dry_run_changes_nothing(client, config):
    root = config.root
    await overwritten_tag_with_delete_untagged(client, root)
    await shared_layers_across_repositories(client, root)
    await unreferenced_blob_outside_grace(client, root)
    (root / "tmp" / "stale.tmp").write_bytes(b"x")
    set_age([root / "tmp" / "stale.tmp"], 2 * DAY)
    rule = RetentionRule(repositories=("**",), keep_last=0)
    settings = replace(SETTINGS, delete_untagged=True, retention=(rule,))
    before = tree(root)
    dry = await collect(FilesystemDriver(root), settings, dry_run=True)
    assert tree(root) == before
    assert dry.dry_run and dry.tags and dry.manifests and dry.blobs and dry.layer_links and dry.repositories
    real = await collect(FilesystemDriver(root), settings)
    assert removed(real) == removed(dry) and real.bytes_freed == dry.bytes_freed
    assert tree(root) != before


async def test_collection_purges_expired_uploads_and_stale_temp_files(client, config):
    root = config.root
    r = await client.post("/v2/app/blobs/uploads/")
    assert r.status == 202
    r = await client.patch(r.headers["Location"], data=b"abandoned", headers={"Content-Range": "0-8"})
    assert r.status == 202
    (root / "tmp" / "stale.tmp").write_bytes(b"x")
    (root / "tmp" / "young.tmp").write_bytes(b"x")
    session = next((root / "uploads").iterdir())
    (session / "info").write_text(json.dumps({"repository": "app", "started_at": time.time() - 2 * DAY,
                                              "owner": None}))
    set_age([session / "data", root / "tmp" / "stale.tmp"], 2 * DAY)
    report = await collect(FilesystemDriver(root), SETTINGS)
    assert (report.uploads, report.temp_files) == (1, 1)
    assert list((root / "uploads").iterdir()) == []
    assert [p.name for p in (root / "tmp").iterdir()] == ["young.tmp"]
    # Temp files are being written: even with no grace period, none younger than an hour goes.
    set_age([root / "tmp" / "young.tmp"], 30 * 60)
    assert (await collect(FilesystemDriver(root), replace(SETTINGS, grace_seconds=0))).temp_files == 0
