"""Pushes that reach old, unreferenced content while a collection runs: deterministic
interleavings, driving the collector phase by phase. Each would leave a manifest or link
naming a deleted blob (or a push told "stored" whose blob is gone) without the reference
guard and its journal."""

from __future__ import annotations

import asyncio
import json
import time

from ocispec.digest import Digest
from storage import FilesystemDriver, ManifestReferenceUnknown, manifests
from storage.fsck import fsck
from storage.gc import Collector, GcSettings
from tests.conftest import OCI_INDEX, OCI_MANIFEST, image_manifest, upload_blob
from tests.support.client import sha256
from tests.test_gc import age_store, blob_path, delete, push

SETTINGS = GcSettings(grace_seconds=3600)


async def old_unreferenced_layer(client, root, content: bytes = b"reused layer") -> str:
    """A layer that was pushed, whose image was deleted, all of it long ago: the next
    collection deletes it (and its link)."""
    image = await push(client, "app", "v1", layers=[content])
    await delete(client, "app", image.digest)
    age_store(root)
    return image.layers[0]


async def assert_clean(root) -> None:
    report = await fsck(FilesystemDriver(root))
    assert report.ok, report.problems


async def marked(driver, run) -> Collector:
    collector = Collector(driver, SETTINGS, run, time.time())
    await collector.mark()
    return collector


async def manifest_reusing(client, repo: str, layer: str, size: int, tag: str) -> bytes:
    """A new image that reuses `layer` without uploading it (a client HEADs it and skips)."""
    config = json.dumps({"tag": tag}).encode()
    config_digest = await upload_blob(client, repo, config)
    data = image_manifest(config_digest, len(config), [(layer, size)])
    r = await client.put(f"/v2/{repo}/manifests/{tag}", data=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return data


async def assert_pullable(client, repo: str, tag: str, data: bytes) -> None:
    r = await client.get(f"/v2/{repo}/manifests/{tag}")
    assert r.status == 200 and await r.read() == data
    for descriptor in [json.loads(data)["config"], *json.loads(data)["layers"]]:
        r = await client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
        assert r.status == 200 and sha256(await r.read()) == descriptor["digest"]


async def test_manifest_push_between_mark_and_sweep(client, config):
    root = config.root
    layer = await old_unreferenced_layer(client, root)
    gc = FilesystemDriver(root)
    async with gc.collection() as run:
        collector = await marked(gc, run)
        assert layer in {d for d, _ in collector.blob_candidates}
        data = await manifest_reusing(client, "app", layer, len(b"reused layer"), "v2")
        await collector.sweep()
    assert blob_path(root, layer).exists()
    await assert_pullable(client, "app", "v2", data)
    await assert_clean(root)


class PausingDriver(FilesystemDriver):
    """The real driver, stopping a manifest push right after it found `pause_at` linked."""

    def __init__(self, root, pause_at: Digest):
        super().__init__(root)
        self.pause_at = pause_at
        self.found = asyncio.Event()
        self.go_on = asyncio.Event()

    async def is_blob_linked(self, repository: str, digest: Digest) -> bool:
        linked = await super().is_blob_linked(repository, digest)
        if digest == self.pause_at:
            self.found.set()
            await self.go_on.wait()
        return linked


async def test_sweep_waits_for_a_push_between_its_checks_and_its_links(client, config):
    root = config.root
    layer = await old_unreferenced_layer(client, root)
    server = PausingDriver(root, Digest.parse(layer))
    config_digest = await upload_blob(client, "app", b'{"new": 1}')
    data = image_manifest(config_digest, 10, [(layer, len(b"reused layer"))])
    gc = FilesystemDriver(root)
    async with gc.collection() as run:
        collector = await marked(gc, run)
        push_task = asyncio.create_task(manifests.put_manifest(server, "app", data, OCI_MANIFEST, tags=("v2",)))
        await asyncio.wait_for(server.found.wait(), 10)  # the push found the layer there
        sweep = asyncio.create_task(collector.sweep())
        await asyncio.sleep(0.3)
        assert not sweep.done() and blob_path(root, layer).exists()  # held off meanwhile
        server.go_on.set()
        await asyncio.wait_for(push_task, 10)
        await asyncio.wait_for(sweep, 10)
    assert blob_path(root, layer).exists()
    await assert_pullable(client, "app", "v2", data)
    await assert_clean(root)


async def test_mount_between_mark_and_sweep(client, config):
    root = config.root
    layer = await old_unreferenced_layer(client, root)
    gc = FilesystemDriver(root)
    async with gc.collection() as run:
        collector = await marked(gc, run)
        r = await client.post(f"/v2/other/blobs/uploads/?mount={layer}&from=app")
        assert r.status == 201  # the client is told the blob is in `other` now
        await collector.sweep()
    assert blob_path(root, layer).exists()
    await assert_clean(root)
    data = await manifest_reusing(client, "other", layer, len(b"reused layer"), "v1")
    await assert_pullable(client, "other", "v1", data)


async def test_upload_of_stored_content_between_mark_and_sweep(client, config):
    root = config.root
    layer = await old_unreferenced_layer(client, root)
    gc = FilesystemDriver(root)
    async with gc.collection() as run:
        collector = await marked(gc, run)
        # A client that did not HEAD first uploads the same bytes again (committed: 201).
        r = await client.post("/v2/app/blobs/uploads/")
        location = r.headers["Location"]
        r = await client.put(f"{location}&digest={layer}" if "?" in location else f"{location}?digest={layer}",
                             data=b"reused layer")
        assert r.status == 201, await r.text()
        await collector.sweep()
    assert blob_path(root, layer).exists()
    data = await manifest_reusing(client, "app", layer, len(b"reused layer"), "v2")
    await assert_pullable(client, "app", "v2", data)
    await assert_clean(root)


async def test_every_batch_reads_the_journal(client, config, monkeypatch):
    """A push between two batches of deletes keeps what it references (seen by the re-read
    under the exclusive guard)."""
    import storage.gc as gc_module
    monkeypatch.setattr(gc_module, "BATCH", 1)
    root = config.root
    first = await old_unreferenced_layer(client, root, b"first")
    second = await old_unreferenced_layer(client, root, b"second")
    gc = FilesystemDriver(root)
    async with gc.collection() as run:
        collector = await marked(gc, run)
        collector.link_candidates.sort(key=lambda c: c[1] != first)  # `first` goes in the first batch
        reads = 0
        pushed = []
        real_read = run.read_journal

        async def read_then_push():
            nonlocal reads
            found = await real_read()
            reads += 1
            if reads == 3:  # the unguarded read before the second batch: push right after it
                pushed.append(await manifest_reusing(client, "app", second, len(b"second"), "v2"))
            return found

        run.read_journal = read_then_push
        await collector.sweep()
    assert pushed and not blob_path(root, first).exists()
    assert blob_path(root, second).exists()
    await assert_pullable(client, "app", "v2", pushed[0])
    await assert_clean(root)


class LockWatchingDriver(FilesystemDriver):
    def __init__(self, root):
        super().__init__(root)
        self.asked = asyncio.Event()

    def repository_lock(self, repository: str):
        self.asked.set()
        return super().repository_lock(repository)


async def test_index_push_whose_child_is_deleted_before_it_links(client, config):
    """A child checked, then deleted (by a client, or as untagged by a collection) before
    the index is linked: the push fails instead of storing an index naming a missing child."""
    root = config.root
    child = await push(client, "multi", "child")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child.digest, "size": len(child.data)}]}).encode()
    server = LockWatchingDriver(root)
    holder = FilesystemDriver(root)
    async with holder.repository_lock("multi"):
        push_task = asyncio.create_task(manifests.put_manifest(server, "multi", index, OCI_INDEX, tags=("latest",)))
        await asyncio.wait_for(server.asked.wait(), 10)  # its other checks are done; it waits for the lock
        await manifests.remove_manifest(holder, "multi", Digest.parse(child.digest), manifests.READ_LIMIT)
    try:
        await asyncio.wait_for(push_task, 10)
        raise AssertionError("the index was stored although its child is gone")
    except ManifestReferenceUnknown as exc:
        assert exc.digests == [child.digest]
    assert (await (await client.get("/v2/multi/tags/list")).json())["tags"] in (None, [])
    await assert_clean(root)


class PausingCollectorDriver(FilesystemDriver):
    """The collector's driver, stopping when it asks for a repository's lock."""

    def __init__(self, root):
        super().__init__(root)
        self.asked = asyncio.Event()
        self.go_on = asyncio.Event()

    def repository_lock(self, repository: str):
        parent = super()

        class Paused:
            async def __aenter__(inner):
                self.asked.set()
                await self.go_on.wait()
                inner.lock = parent.repository_lock(repository)
                return await inner.lock.__aenter__()

            async def __aexit__(inner, *exc):
                return await inner.lock.__aexit__(*exc)

        return Paused()


async def test_untagged_manifest_tagged_again_during_the_prune(client, config):
    root = config.root
    image = await push(client, "app", "v1", layers=[b"untagged soon"])
    r = await client.delete("/v2/app/manifests/v1")
    assert r.status == 202
    age_store(root)
    gc = PausingCollectorDriver(root)
    settings = GcSettings(grace_seconds=3600, delete_untagged=True)
    async with gc.collection() as run:
        collector = Collector(gc, settings, run, time.time())
        prune = asyncio.create_task(collector.prune())
        await asyncio.wait_for(gc.asked.wait(), 10)  # planned to remove it; now wants the lock
        r = await client.put("/v2/app/manifests/again", data=image.data, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201
        gc.go_on.set()
        await asyncio.wait_for(prune, 10)
        await collector.mark()
        await collector.sweep()
    assert collector.report.manifests == []
    await assert_pullable(client, "app", "again", image.data)
    await assert_clean(root)
