"""`/v2/<name>/manifests/<reference>` for OCI and Docker manifests, indexes and artifacts."""

import json

import pytest

from tests.conftest import OCI_INDEX, OCI_MANIFEST, error_code, image_manifest, push_image, upload_blob
from tests.support.client import sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


async def put(client, repo, ref, data, media_type):
    return await client.put(f"/v2/{repo}/manifests/{ref}", data=data, headers={"Content-Type": media_type})


async def test_push_and_get_by_tag_and_digest(client):
    digest, manifest = await push_image(client, "app", "v1")
    assert digest == sha256(manifest)
    for ref in ("v1", digest):
        r = await client.get(f"/v2/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status == 200
        assert await r.read() == manifest
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["Content-Length"] == str(len(manifest))
        r = await client.head(f"/v2/app/manifests/{ref}")
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(manifest))
        assert r.headers["Docker-Content-Digest"] == digest
        assert await r.read() == b""


async def test_put_response_headers(client):
    config = await upload_blob(client, "app", b"{}")
    manifest = image_manifest(config, 2)
    r = await put(client, "app", "v1", manifest, OCI_MANIFEST)
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/app/manifests/{sha256(manifest)}"
    assert r.headers["Docker-Content-Digest"] == sha256(manifest)
    assert "OCI-Subject" not in r.headers


async def test_bytes_are_kept_exactly(client):
    config = await upload_blob(client, "app", b"{}")
    # Odd spacing and key order: the digest must be of these exact bytes.
    manifest = ('{ "schemaVersion":2,\n  "config": {"size": 2, "digest": "%s", '
                '"mediaType": "application/vnd.oci.image.config.v1+json"}, "layers": [],'
                '"mediaType": "%s"}  \n' % (config, OCI_MANIFEST)).encode()
    r = await put(client, "app", "odd", manifest, OCI_MANIFEST)
    assert r.status == 201
    r = await client.get("/v2/app/manifests/odd")
    assert await r.read() == manifest
    assert sha256(await r.read()) == r.headers["Docker-Content-Digest"]


async def test_push_by_digest(client):
    config = await upload_blob(client, "app", b"{}")
    manifest = image_manifest(config, 2)
    r = await put(client, "app", sha256(manifest), manifest, OCI_MANIFEST)
    assert r.status == 201
    r = await put(client, "app", sha256(b"other"), manifest, OCI_MANIFEST)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_push_by_digest_with_tag_parameters(client):
    config = await upload_blob(client, "app", b"{}")
    manifest = image_manifest(config, 2)
    r = await put(client, "app", f"{sha256(manifest)}?tag=one&tag=two", manifest, OCI_MANIFEST)
    assert r.status == 201
    tags = await (await client.get("/v2/app/tags/list")).json()
    assert tags["tags"] == ["one", "two"]


async def test_docker_schema2_and_manifest_list(client):
    config = await upload_blob(client, "app", b'{"architecture":"amd64","os":"linux"}')
    layer = await upload_blob(client, "app", b"layer bytes")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config,
                   "size": len(b'{"architecture":"amd64","os":"linux"}')},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer,
                    "size": 11}]}).encode()
    r = await put(client, "app", "amd64", manifest, DOCKER_MANIFEST)
    assert r.status == 201, await r.text()
    manifest_list = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = await put(client, "app", "latest", manifest_list, DOCKER_LIST)
    assert r.status == 201, await r.text()
    r = await client.get("/v2/app/manifests/latest")
    assert r.headers["Content-Type"] == DOCKER_LIST
    assert await r.read() == manifest_list


async def test_oci_index(client):
    digest, manifest = await push_image(client, "app", "amd64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = await put(client, "app", "latest", index, OCI_INDEX)
    assert r.status == 201
    r = await client.get("/v2/app/manifests/latest")
    assert r.headers["Content-Type"] == OCI_INDEX and await r.read() == index


async def test_index_with_missing_child(client):
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(b"missing"), "size": 7}]}).encode()
    r = await put(client, "app", "latest", index, OCI_INDEX)
    assert r.status == 400 and await error_code(r) == "MANIFEST_UNKNOWN"
    assert (await client.get("/v2/app/manifests/latest")).status == 404


async def test_missing_blob(client):
    config = await upload_blob(client, "app", b"{}")
    manifest = image_manifest(config, 2, [(sha256(b"not uploaded"), 12)])
    r = await put(client, "app", "v1", manifest, OCI_MANIFEST)
    assert r.status == 400 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    body = await r.json()
    assert body["errors"][0]["detail"]["digests"] == [sha256(b"not uploaded")]


async def test_blob_of_another_repository_is_unknown(client):
    config = await upload_blob(client, "other", b"{}")
    r = await put(client, "app", "v1", image_manifest(config, 2), OCI_MANIFEST)
    assert r.status == 400 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"


async def test_descriptor_size_must_match_blob(client):
    config = await upload_blob(client, "app", b"{}")
    r = await put(client, "app", "v1", image_manifest(config, 3), OCI_MANIFEST)
    assert r.status == 400 and await error_code(r) == "MANIFEST_INVALID"


async def test_artifact_manifest(client):
    config = await upload_blob(client, "app", b"{}")
    blob = await upload_blob(client, "app", b"signature")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.example.sig.v1", "digest": blob, "size": 9}]}).encode()
    r = await put(client, "app", "sig", manifest, OCI_MANIFEST)
    assert r.status == 201


@pytest.mark.parametrize("body, content_type, code, status", [
    (b"{not json", OCI_MANIFEST, "MANIFEST_INVALID", 400),
    (b"[]", OCI_MANIFEST, "MANIFEST_INVALID", 400),
    (b'{"schemaVersion": 3}', OCI_MANIFEST, "MANIFEST_INVALID", 400),
    (b'{"schemaVersion": 2, "mediaType": "%s", "manifests": []}' % OCI_INDEX.encode(), OCI_MANIFEST,
     "MANIFEST_INVALID", 400),
    (b'{"schemaVersion": 2, "mediaType": "%s"}' % OCI_MANIFEST.encode(), OCI_MANIFEST, "MANIFEST_INVALID", 400),
    (b'{"schemaVersion": 2, "mediaType": "%s", "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}}'
     % OCI_MANIFEST.encode(), OCI_MANIFEST, "MANIFEST_INVALID", 400),
    (b'{"schemaVersion": 1, "name": "app", "tag": "v1", "fsLayers": []}',
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "UNSUPPORTED", 415),
    (b'{"schemaVersion": 1, "name": "app", "tag": "v1", "fsLayers": []}', "application/json", "UNSUPPORTED", 415),
    (b'{"schemaVersion": 2, "mediaType": "text/plain"}', "text/plain", "UNSUPPORTED", 415),
])
async def test_invalid_manifests(client, body, content_type, code, status):
    r = await put(client, "app", "v1", body, content_type)
    assert r.status == status, await r.text()
    assert await error_code(r) == code
    assert (await client.get("/v2/app/manifests/v1")).status == 404


async def test_size_limit(client):
    config = await upload_blob(client, "app", b"{}")
    padding = {"org.example.pad": "x" * (4 * 1024 * 1024 - 400)}
    just_under = image_manifest(config, 2, annotations=padding)
    assert len(just_under) <= 4 * 1024 * 1024
    assert (await put(client, "app", "big", just_under, OCI_MANIFEST)).status == 201
    five_mib = image_manifest(config, 2, annotations={"org.example.pad": "x" * (5 * 1024 * 1024)})
    r = await put(client, "app", "huge", five_mib, OCI_MANIFEST)
    assert r.status == 413 and await error_code(r) == "MANIFEST_INVALID"
    assert (await client.get("/v2/app/manifests/huge")).status == 404


async def test_unknown_manifest_and_bad_references(client):
    r = await client.get("/v2/app/manifests/nope")
    assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN"
    r = await client.get("/v2/app/manifests/sha256:short")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_delete_by_tag_keeps_manifest(client):
    digest, _ = await push_image(client, "app", "v1")
    r = await client.delete("/v2/app/manifests/v1")
    assert r.status == 202
    assert (await client.get("/v2/app/manifests/v1")).status == 404
    assert (await client.get(f"/v2/app/manifests/{digest}")).status == 200
    r = await client.delete("/v2/app/manifests/v1")
    assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN"


async def test_delete_by_digest_removes_manifest_and_its_tags(client):
    digest, _ = await push_image(client, "app", "v1")
    await client.put("/v2/app/manifests/v2", data=(await (await client.get("/v2/app/manifests/v1")).read()),
                     headers={"Content-Type": OCI_MANIFEST})
    r = await client.delete(f"/v2/app/manifests/{digest}")
    assert r.status == 202
    for ref in (digest, "v1", "v2"):
        assert (await client.get(f"/v2/app/manifests/{ref}")).status == 404
    assert (await client.get("/v2/app/tags/list")).status == 200
    r = await client.delete(f"/v2/app/manifests/{digest}")
    assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN"


async def test_delete_in_unknown_repository(client):
    r = await client.delete(f"/v2/ghost/manifests/{sha256(b'x')}")
    assert r.status == 404 and await error_code(r) == "NAME_UNKNOWN"


async def test_delete_manifest_disabled(make_client):
    client = await make_client(delete_enabled=False)
    digest, _ = await push_image(client, "app", "v1")
    for ref in ("v1", digest):
        r = await client.delete(f"/v2/app/manifests/{ref}")
        assert r.status == 405 and await error_code(r) == "UNSUPPORTED"
    assert (await client.get("/v2/app/manifests/v1")).status == 200


async def test_retag_moves_tag(client):
    first, _ = await push_image(client, "app", "latest", layer=b"one")
    second, _ = await push_image(client, "app", "latest", layer=b"two")
    assert first != second
    r = await client.get("/v2/app/manifests/latest")
    assert r.headers["Docker-Content-Digest"] == second
    assert (await client.get(f"/v2/app/manifests/{first}")).status == 200


async def _ambiguous_cases(client):
    """Documents with the fields of both an image manifest and an index, every reference valid."""
    image_digest, image = await push_image(client, "app", "base")
    config = await upload_blob(client, "app", b"{}")
    child = {"mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(image)}
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2}
    return {
        "index with config": ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child],
                               "config": config_desc}, OCI_INDEX),
        "index with layers": ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child],
                               "layers": [config_desc]}, OCI_INDEX),
        "manifest with manifests": ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                                     "layers": [], "manifests": [child]}, OCI_MANIFEST),
        "no mediaType, pushed as manifest": ({"schemaVersion": 2, "config": config_desc, "layers": [],
                                              "manifests": [child]}, OCI_MANIFEST),
        "no mediaType, pushed as index": ({"schemaVersion": 2, "config": config_desc, "layers": [],
                                           "manifests": [child]}, OCI_INDEX),
        "no mediaType, pushed as JSON": ({"schemaVersion": 2, "config": config_desc, "layers": [],
                                          "manifests": [child]}, "application/json"),
    }


async def test_ambiguous_manifests_are_refused(client):
    for case, (doc, content_type) in (await _ambiguous_cases(client)).items():
        data = json.dumps(doc).encode()
        r = await put(client, "app", "ambiguous", data, content_type)
        assert r.status == 400, (case, await r.text())
        assert await error_code(r) == "MANIFEST_INVALID", case
        assert (await client.get(f"/v2/app/manifests/{sha256(data)}")).status == 404, case
    assert (await client.get("/v2/app/manifests/ambiguous")).status == 404


def _hostile_bodies() -> dict[str, bytes]:
    image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": sha256(b"{}"), "size": 2}}).encode()
    return {
        "nesting depth 1000": image[:-1] + b', "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "nesting depth 200000": b'{"schemaVersion": 2, "x": ' + b"{\"a\":" * 200_000 + b"1" + b"}" * 200_001,
        "5000-digit integer": image[:-1] + b', "x": ' + b"7" * 5000 + b"}",
        "5000-digit schemaVersion": b'{"schemaVersion": ' + b"2" * 5000 + b"}",
        "NaN": image[:-1] + b', "x": NaN}',
    }


async def test_hostile_json_is_400_without_a_traceback(client, caplog):
    await upload_blob(client, "app", b"{}")
    for case, body in _hostile_bodies().items():
        caplog.clear()
        r = await put(client, "app", "hostile", body, OCI_MANIFEST)
        assert r.status == 400, (case, r.status)
        assert await error_code(r) == "MANIFEST_INVALID", case
        assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")], case
    assert (await client.get("/v2/app/manifests/hostile")).status == 404


async def test_strict_manifest_grammar(client):
    config = await upload_blob(client, "app", b"{}")
    good = json.loads(image_manifest(config, 2))
    cases = {
        "UTF-8 byte order mark": b"\xef\xbb\xbf" + json.dumps(good).encode(),
        "schemaVersion 2.0": json.dumps({**good, "schemaVersion": 2.0}).encode(),
        "schemaVersion true": json.dumps({**good, "schemaVersion": True}).encode(),
        "UTF-16": json.dumps(good).encode("utf-16"),
    }
    for case, body in cases.items():
        r = await put(client, "app", "strict", body, OCI_MANIFEST)
        assert r.status == 400, (case, r.status)
        assert await error_code(r) == "MANIFEST_INVALID", case
    assert (await client.get("/v2/app/manifests/strict")).status == 404
    assert (await put(client, "app", "strict", json.dumps(good).encode(), OCI_MANIFEST)).status == 201


async def test_reference_that_is_neither_tag_nor_digest_is_unknown(client):
    """It cannot name a manifest: GET/HEAD/DELETE answer 404 as distribution (whose routes do not
    match it); a PUT to it is a bad tag."""
    await push_image(client, "app", "v1")
    for ref in (".INVALID_MANIFEST_NAME", "-bad-tag", "t" * 129):
        r = await client.get(f"/v2/app/manifests/{ref}")
        assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN", ref
        assert (await client.head(f"/v2/app/manifests/{ref}")).status == 404, ref
        r = await client.delete(f"/v2/app/manifests/{ref}")
        assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN", ref
        r = await put(client, "app", ref, b"{}", OCI_MANIFEST)
        assert r.status == 400 and await error_code(r) == "TAG_INVALID", ref
    # Unknown repository: still a 404 (the repository is what is unknown).
    r = await client.get("/v2/ghost/manifests/.INVALID_MANIFEST_NAME")
    assert r.status == 404
    assert (await client.get("/v2/app/manifests/v1")).status == 200
