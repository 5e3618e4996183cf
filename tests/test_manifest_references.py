"""Checking the references of a pushed manifest: once per distinct digest, without
stalling the event loop (other requests are answered while a large manifest is checked)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from ocispec.digest import Digest
from registry.app import make_app
from storage import FilesystemDriver
from storage.layout import Layout
from tests.conftest import OCI_INDEX, OCI_MANIFEST, error_code, push_image, upload_blob

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"


class CountingDriver(FilesystemDriver):
    """The real filesystem driver, counting the existence checks a manifest push makes."""

    def __init__(self, root):
        super().__init__(root)
        self.calls: Counter = Counter()
        self.on_check = None  # called at each existence check, for the concurrency test

    def _count(self, method: str, digest: Digest) -> None:
        self.calls[method, str(digest)] += 1
        if self.on_check is not None:
            self.on_check()

    async def stat_blob(self, digest):
        self._count("stat_blob", digest)
        return await super().stat_blob(digest)

    async def is_blob_linked(self, repository, digest):
        self._count("is_blob_linked", digest)
        return await super().is_blob_linked(repository, digest)

    async def get_manifest_link(self, repository, digest):
        self._count("get_manifest_link", digest)
        return await super().get_manifest_link(repository, digest)


@pytest.fixture
async def counted(aiohttp_client, config):
    driver = CountingDriver(config.root)
    return await aiohttp_client(make_app(config, driver)), driver


def manifest_of(config_digest: str, layers: list[tuple[str, int]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": CONFIG, "digest": config_digest, "size": 2},
                       "layers": [{"mediaType": LAYER, "digest": d, "size": s} for d, s in layers]}).encode()


async def test_each_distinct_blob_is_checked_once(counted):
    client, driver = counted
    config = await upload_blob(client, "app", b"{}")
    layer = await upload_blob(client, "app", b"layer")
    driver.calls.clear()
    r = await client.put("/v2/app/manifests/v1", data=manifest_of(config, [(layer, 5)] * 500 + [(config, 2)] * 100),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    assert {digest for _, digest in driver.calls} == {config, layer}
    # Once in each round of checks: before the content is stored, and under the lock.
    assert max(driver.calls.values()) == 2, driver.calls


async def test_each_distinct_child_of_an_index_is_checked_once(counted):
    client, driver = counted
    child, data = await push_image(client, "app", "amd64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": len(data)}] * 300}).encode()
    driver.calls.clear()
    r = await client.put("/v2/app/manifests/latest", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201, await r.text()
    assert driver.calls == Counter({("get_manifest_link", child): 2})  # before storing, under the lock


async def test_a_repeated_blob_with_a_wrong_size_is_still_refused(client):
    config = await upload_blob(client, "app", b"{}")
    layer = await upload_blob(client, "app", b"layer")
    r = await client.put("/v2/app/manifests/v1", data=manifest_of(config, [(layer, 5), (layer, 6)]),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and await error_code(r) == "MANIFEST_INVALID"


def seed_blobs(root, repository: str, count: int) -> list[tuple[str, int]]:
    """`count` distinct blobs linked into `repository`, written straight into the layout (fast)."""
    layout = Layout(root)
    blobs = []
    for i in range(count):
        data = b"blob %d" % i
        digest = Digest.of_bytes(data)
        for path, content in ((layout.blob(digest), data), (layout.layer_link(repository, digest), str(digest).encode())):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        blobs.append((str(digest), len(data)))
    return blobs


async def test_other_requests_are_answered_while_a_large_manifest_is_checked(counted, config):
    client, driver = counted
    config_digest = await upload_blob(client, "app", b"{}")
    layers = seed_blobs(config.root, "app", 12_000)
    manifest = manifest_of(config_digest, layers)

    answered = 0          # GET /v2/ answered so far
    seen_at_check = []    # `answered` as seen by each existence check of the push
    driver.on_check = lambda: seen_at_check.append(answered)
    put_done = asyncio.Event()

    async def ping_until_put_done():
        nonlocal answered
        while not put_done.is_set():
            assert (await client.get("/v2/")).status == 200
            answered += 1

    gaps = []

    async def probe_loop_lag():
        last = time.perf_counter()
        while not put_done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def push():
        try:
            return await client.put("/v2/app/manifests/big", data=manifest, headers={"Content-Type": OCI_MANIFEST})
        finally:
            put_done.set()

    started = time.perf_counter()
    r, _, _ = await asyncio.gather(push(), ping_until_put_done(), probe_loop_lag())
    duration = time.perf_counter() - started
    assert r.status == 201, await r.text()
    assert len(seen_at_check) >= 2 * len(layers)
    # Requests were answered between the first and the last existence check of the push.
    assert seen_at_check[-1] > seen_at_check[0], (seen_at_check[0], seen_at_check[-1])
    # And the loop never stalled for long. Generous bound: the unfixed server stalls for
    # nearly the whole push in one go (0.37 s of 0.42 s measured); fixed, the longest gap
    # is a garbage collection or a busy machine (0.02-0.11 s of 0.45-1.07 s measured).
    assert max(gaps) < max(0.4 * duration, 0.05), (max(gaps), duration)
