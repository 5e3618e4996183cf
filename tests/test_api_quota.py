"""Namespace quotas over the API: a push that would pass a quota is 403 DENIED and leaves nothing.

Every place that adds a blob to a repository is checked: the PUT that ends an upload, the
monolithic POST ?digest=, a cross-repository mount and a manifest PUT. A blob counts once
per namespace, however many of its repositories hold it.
"""

import os
from dataclasses import replace

from aiohttp.test_utils import TestServer

from registry.app import make_app
from registry.config import make_quota
from registry.serve import handler_settings
from storage import FilesystemDriver, usage
from storage.driver import StorageDriver
from tests.conftest import OCI_MANIFEST, image_manifest, push_image, serve_app, upload_blob
from tests.support.client import sha256

A = b"a" * 600
B = b"b" * 500


async def quota_client(make_client, *quotas):
    return await make_client(quotas=tuple(make_quota(globs, limit) for globs, limit in quotas))


async def denied(response) -> dict:
    assert response.status == 403, await response.text()
    body = await response.json(content_type=None)
    assert body["errors"][0]["code"] == "DENIED", body
    return body["errors"][0]


async def chunked_upload(client, repo: str, data: bytes):
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202, await r.text()
    location = r.headers["Location"]
    r = await client.patch(location, data=data, headers={"Content-Range": f"0-{len(data) - 1}"})
    assert r.status == 202, await r.text()
    return r.headers["Location"], r.headers["Docker-Upload-UUID"]


def stored_blob(root, data: bytes):
    hex_ = sha256(data).split(":")[1]
    return root / "blobs" / "sha256" / hex_[:2] / hex_


async def used(config, globs) -> int:
    return await FilesystemDriver(config.root).usage_ledger(make_quota(globs, 1).ledger).total()


async def test_commit_over_the_quota_is_denied_and_leaves_nothing(make_client, config):
    client = await quota_client(make_client, (["team/**"], 1000))
    await upload_blob(client, "team/a", A)
    location, uuid = await chunked_upload(client, "team/b", B)

    error = await denied(await client.put(f"{location}?digest={sha256(B)}"))
    assert "team/**" in error["message"] and "600" in error["message"], error
    assert error["detail"] == {"quota": ["team/**"], "max_bytes": 1000, "used_bytes": 600, "needed_bytes": 500}
    assert not stored_blob(config.root, B).exists()
    assert (await client.head(f"/v2/team/b/blobs/{sha256(B)}")).status == 404
    assert (await client.get(location)).status == 404  # the session ended
    assert os.listdir(config.root / "uploads") == []
    assert await used(config, ["team/**"]) == 600


async def test_commit_with_a_final_chunk_over_the_quota(make_client, config):
    client = await quota_client(make_client, (["team/**"], 1000))
    await upload_blob(client, "team/a", A)
    r = await client.post("/v2/team/b/blobs/uploads/")
    await denied(await client.put(f"{r.headers['Location']}?digest={sha256(B)}", data=B))
    assert not stored_blob(config.root, B).exists()
    assert os.listdir(config.root / "uploads") == []


async def test_monolithic_post_over_the_quota(make_client, config):
    client = await quota_client(make_client, (["team/**"], 1000))
    await upload_blob(client, "team/a", A)
    await denied(await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B))

    async def stream():  # no Content-Length: the quota caps what is read
        yield B[:100]
        yield B[100:]

    await denied(await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=stream()))
    assert not stored_blob(config.root, B).exists()
    assert (await client.head(f"/v2/team/b/blobs/{sha256(B)}")).status == 404
    assert await used(config, ["team/**"]) == 600


async def test_mount_over_the_quota(make_client, config):
    client = await quota_client(make_client, (["team/**"], 1000))
    await upload_blob(client, "team/a", A)
    await upload_blob(client, "elsewhere", B)
    error = await denied(await client.post(f"/v2/team/b/blobs/uploads/?mount={sha256(B)}&from=elsewhere"))
    assert "team/**" in error["message"]
    assert (await client.head(f"/v2/team/b/blobs/{sha256(B)}")).status == 404
    assert await used(config, ["team/**"]) == 600


async def test_manifests_count(make_client, config):
    manifest = image_manifest(sha256(A), len(A), [(sha256(B), len(B))])
    client = await quota_client(make_client, (["team/**"], len(A) + len(B) + len(manifest) - 1))
    await upload_blob(client, "team/a", A)
    await upload_blob(client, "team/a", B)
    r = await client.put("/v2/team/a/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST})
    error = await denied(r)
    assert error["detail"]["needed_bytes"] == len(manifest)
    assert (await client.get("/v2/team/a/manifests/v1")).status == 404
    assert not stored_blob(config.root, manifest).exists()


async def test_a_blob_counts_once_per_namespace(make_client, config):
    client = await quota_client(make_client, (["team/**"], 1000))
    await upload_blob(client, "team/a", A)
    # The same blob into other repositories of the namespace: no more room needed.
    location, _ = await chunked_upload(client, "team/b", A)
    assert (await client.put(f"{location}?digest={sha256(A)}")).status == 201
    assert (await client.post(f"/v2/team/c/blobs/uploads/?mount={sha256(A)}&from=team/a")).status == 201
    await upload_blob(client, "team/d/deep", A)
    assert await used(config, ["team/**"]) == 600
    # And the whole image, layer shared, pushes into two repositories of a full namespace.
    client = await quota_client(make_client, (["team/**"], 600 + 2 + len(image_manifest(sha256(b"{}"), 2,
                                                                                          [(sha256(A), 600)]))))
    for repo in ("team/a", "team/b"):
        await push_image(client, repo, "v1", layer=A, config=b"{}")
    assert await used(config, ["team/**"]) == 600 + 2 + len(image_manifest(sha256(b"{}"), 2, [(sha256(A), 600)]))


async def test_every_matching_quota_applies_and_others_do_not(make_client, config):
    client = await quota_client(make_client, (["team/**"], 10_000), (["team/small/*"], 1000), (["solo"], 1))
    await upload_blob(client, "team/small/a", A)
    await denied(await client.post(f"/v2/team/small/b/blobs/uploads/?digest={sha256(B)}", data=B))
    await upload_blob(client, "team/big", B)  # only team/** applies there
    await upload_blob(client, "free", A + B)  # no quota at all
    assert await used(config, ["team/**"]) == 1100
    assert await used(config, ["team/small/*"]) == 600
    assert await used(config, ["solo"]) == 0


async def test_a_body_of_unknown_length_is_capped_by_the_tightest_quota(make_client, config):
    client = await quota_client(make_client, (["team/**"], 10_000), (["team/small/*"], 1000))
    await upload_blob(client, "team/a", b"x" * 9600)  # 400 left there, 1000 in team/small/*

    async def stream():
        yield B

    error = await denied(await client.post(f"/v2/team/small/b/blobs/uploads/?digest={sha256(B)}", data=stream()))
    assert error["detail"] == {"quota": ["team/**"], "max_bytes": 10_000, "used_bytes": 9600, "needed_bytes": None}
    assert await used(config, ["team/small/*"]) == 0


async def test_a_refusal_by_one_quota_charges_none(make_client, config):
    client = await quota_client(make_client, (["team/**"], 10_000), (["team/small/*"], 100))
    await denied(await client.post(f"/v2/team/small/b/blobs/uploads/?digest={sha256(B)}", data=B))
    assert await used(config, ["team/**"]) == 0


async def test_deleting_frees_the_quota_once_recounted(make_client, config):
    quotas = ((["team/**"], 1000),)
    client = await quota_client(make_client, *quotas)
    await upload_blob(client, "team/a", A)
    await denied(await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B))
    driver = FilesystemDriver(config.root)
    async with driver.repository_lock("team/a"):
        await driver.delete_repository("team/a")
    assert await used(config, ["team/**"]) == 600  # until recounted
    await usage.recount(driver, [make_quota(globs, limit) for globs, limit in quotas])
    assert await used(config, ["team/**"]) == 0
    assert (await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B)).status == 201


async def test_start_up_counts_what_is_already_stored(make_client, config):
    client = await make_client()
    digest, _ = await push_image(client, "team/a", "v1", layer=A, config=b"{}")
    client = await quota_client(make_client, (["team/**"], 1000))
    stored = 600 + 2 + len(await (await client.get(f"/v2/team/a/manifests/{digest}")).read())
    assert await used(config, ["team/**"]) == stored
    error = await denied(await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B))
    assert error["detail"]["used_bytes"] == stored


async def test_without_quotas_nothing_is_counted(client, config):
    await upload_blob(client, "team/a", A)
    assert not (config.root / "usage").exists()


class TagWritesFail(FilesystemDriver):
    """A store whose disk fills up between a manifest's revision link and its tag."""

    staged_manifest_links = StorageDriver.staged_manifest_links  # one driver call per link

    async def set_tag(self, repository, tag, digest):
        raise OSError(28, "No space left on device")


async def test_a_push_failing_after_its_link_still_counts(aiohttp_client, config):
    quotas = (make_quota(["team/**"], 10_000),)
    config = replace(config, quotas=quotas)
    client = await serve_app(aiohttp_client, config)
    await upload_blob(client, "team/a", A)
    await upload_blob(client, "team/a", B)
    manifest = image_manifest(sha256(A), len(A), [(sha256(B), len(B))])
    server = TestServer(make_app(config, TagWritesFail(config.root)))
    await server.start_server(**handler_settings(config))
    failing = await aiohttp_client(server)
    r = await failing.put("/v2/team/a/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 500
    assert (await client.get(f"/v2/team/a/manifests/{sha256(manifest)}")).status == 200  # stored all the same
    assert await used(config, ["team/**"]) == len(A) + len(B) + len(manifest)


async def test_a_mount_of_an_unknown_blob_still_starts_an_upload_in_a_full_namespace(make_client, config):
    client = await quota_client(make_client, (["team/**"], 600))
    await upload_blob(client, "team/a", A)
    r = await client.post(f"/v2/team/b/blobs/uploads/?mount={sha256(b'unknown')}&from=team/a")
    assert r.status == 202, await r.text()
    client = await quota_client(make_client, (["team/**"], 500))  # lowered below what is stored
    assert (await client.post(f"/v2/team/b/blobs/uploads/?mount={sha256(b'unknown')}&from=team/a")).status == 202


async def test_a_collection_frees_the_quota_at_once(make_client, config):
    """Deleted content stops counting as soon as the garbage collection has removed it."""
    from ocispec.digest import Digest
    from registry.quota import collect_garbage
    from storage.layout import Layout

    quotas = ((["team/**"], 1000),)
    client = await quota_client(make_client, *quotas)
    digest = Digest.parse(await upload_blob(client, "team/a", A))  # linked, no manifest names it
    await denied(await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B))
    layout = Layout(config.root)
    for path in (layout.blob(digest), layout.layer_link("team/a", digest)):
        os.utime(path, (1, 1))  # long past the grace period
    settings = replace(config, quotas=tuple(make_quota(globs, limit) for globs, limit in quotas))
    report = await collect_garbage(FilesystemDriver(config.root), settings)
    assert report.bytes_freed == len(A)
    assert await used(config, ["team/**"]) == 0
    assert (await client.post(f"/v2/team/b/blobs/uploads/?digest={sha256(B)}", data=B)).status == 201
