"""The reference registry (docker-registry, `s3` driver) on the tests' SeaweedFS, behind the
counting proxy: an image goes in and comes back byte for byte, its blobs are objects in the bucket,
and the proxy counts every S3 request the registry makes."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from tests.s3_roundtrips import OPERATIONS, format_table, measure_roundtrips, wait_still
from tests.support.client import RegistryClient, sha256
from tests.support.layouts import blob_path, reachable_blobs, tag_digest
from tests.support.paths import IMAGES, require_shared
from tests.support.reference_s3 import start_reference_s3
from tests.support.s3_counter import CountingProxy, SeaweedMetricsCounter
from tests.support.servers import stop

pytestmark = pytest.mark.e2e

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


@pytest.fixture(scope="module")
def proxy(s3_bucket):
    with CountingProxy(s3_bucket.endpoint) as counting:
        yield counting


@pytest.fixture(scope="module")
def reference(s3_bucket, proxy, tmp_path_factory):
    """docker-registry over the module's bucket, reaching it through the counting proxy."""
    server = start_reference_s3(tmp_path_factory.mktemp("reference-s3"), proxy.via(s3_bucket))
    yield server
    stop(server)


async def pull_and_compare(session, base: str, repo: str, layout, reference: str, digest: str) -> int:
    """Fetch manifest `reference` and everything below it; each must equal the layout's bytes.
    Returns how many objects were compared."""
    async with session.get(f"{base}/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}) as r:
        assert r.status == 200, await r.text()
        body = await r.read()
    assert body == blob_path(layout, digest).read_bytes() and r.headers["Docker-Content-Digest"] == digest
    compared = 1
    document = json.loads(body)
    for child in document.get("manifests", []):
        compared += await pull_and_compare(session, base, repo, layout, child["digest"], child["digest"])
    for descriptor in ([document["config"]] if "config" in document else []) + document.get("layers", []):
        async with session.get(f"{base}/v2/{repo}/blobs/{descriptor['digest']}") as r:
            assert r.status == 200, await r.text()
            assert await r.read() == blob_path(layout, descriptor["digest"]).read_bytes()
        compared += 1
    return compared


async def test_image_in_and_out_through_s3(reference, proxy, seaweedfs, s3_bucket):
    require_shared()
    layout = IMAGES / "busybox-multiarch-docker"  # media types in every manifest
    mark = proxy.count()
    async with aiohttp.ClientSession(trust_env=False) as session:
        pushed = await RegistryClient(session, reference.url).push_layout(layout, "lib/busybox", "latest")
        assert pushed == tag_digest(layout, "latest")
        compared = await pull_and_compare(session, reference.url, "lib/busybox", layout, "latest", pushed)
        async with session.get(f"{reference.url}/v2/lib/busybox/tags/list") as r:
            assert (await r.json())["tags"] == ["latest"]
    expected = reachable_blobs(layout, pushed)
    assert compared >= len(expected)
    # Everything is in the bucket, content-addressed, as the s3 driver lays it out.
    stored = seaweedfs.list_keys(s3_bucket.bucket, "docker/registry/v2/blobs/sha256/")
    assert {key.split("/")[-2] for key in stored if key.endswith("/data")} >= expected
    # All of it went through the proxy, path-style, to this bucket, and every signature verified.
    calls = proxy.calls_since(mark)
    assert len(calls) > 2 * len(expected)
    assert all(call.path.split("/")[1] == s3_bucket.bucket for call in calls), calls[:5]
    assert not [call for call in calls if call.status in (400, 403) or (call.status or 500) >= 500]


async def test_proxy_counts_every_request_seaweedfs_sees(reference, proxy, seaweedfs):
    metrics = SeaweedMetricsCounter(seaweedfs.metrics_url)
    await wait_still(proxy, 0.3)
    before_proxy, before_server = proxy.count(), metrics.count()
    async with aiohttp.ClientSession(trust_env=False) as session:
        digest = await RegistryClient(session, reference.url).push_blob("lib/counted", os.urandom(300_000))
        async with session.get(f"{reference.url}/v2/lib/counted/blobs/{digest}") as r:
            assert r.status == 200 and sha256(await r.read()) == digest
    after_proxy = await wait_still(proxy, 0.3)
    await asyncio.sleep(0.2)
    seen = proxy.operations_since(before_proxy)
    assert after_proxy - before_proxy == metrics.count() - before_server > 0, seen
    assert seen["GetObject"] >= 1 and seen["PutObject"] >= 1, seen


async def test_roundtrip_table(reference, proxy):
    results = await measure_roundtrips(reference.url, proxy, repo="lib/roundtrips")
    assert [r.operation for r in results] == list(OPERATIONS)
    by_name = {r.operation: r for r in results}
    # Bytes flow through the registry here (no redirect): the blob GET reads the object.
    assert by_name["blob GET"].breakdown["GetObject"] >= 1
    assert by_name["manifest GET by tag"].breakdown["GetObject"] >= 1
    assert by_name["manifest PUT"].breakdown["PutObject"] >= 1
    upload = by_name["1 MiB monolithic upload"].breakdown
    assert upload["PutObject"] + upload["UploadPart"] + upload["CopyObject"] >= 1
    assert by_name["tag list"].breakdown["ListObjects"] + by_name["tag list"].breakdown["ListObjectsV2"] >= 1
    assert all(r.requests == sum(r.breakdown.values()) for r in results)
    table = format_table({"reference": results})
    assert all(f"| {operation} |" in table for operation in OPERATIONS)
