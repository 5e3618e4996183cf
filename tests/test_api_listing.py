"""Tags list, catalog and referrers, with pagination and filtering."""

import json

import pytest

from tests.conftest import OCI_INDEX, OCI_MANIFEST, error_code, push_image, upload_blob
from tests.support.client import sha256


async def tag_all(client, repo, tags):
    digest, manifest = await push_image(client, repo, tags[0])
    for tag in tags[1:]:
        r = await client.put(f"/v2/{repo}/manifests/{tag}", data=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201
    return digest


async def test_tags_list_sorted(client):
    await tag_all(client, "app", ["v2", "latest", "v10", "V1"])
    r = await client.get("/v2/app/tags/list")
    assert r.status == 200
    assert await r.json() == {"name": "app", "tags": ["V1", "latest", "v10", "v2"]}
    assert "Link" not in r.headers


async def test_tags_pagination_follows_link(client):
    tags = [f"t{i:02d}" for i in range(7)]
    await tag_all(client, "app", tags)
    seen, url = [], "/v2/app/tags/list?n=3"
    while url:
        r = await client.get(url)
        body = await r.json()
        assert len(body["tags"]) <= 3
        seen += body["tags"]
        link = r.headers.get("Link")
        url = link[1:link.index(">")] if link else None
        if link:
            assert link.endswith('rel="next"')
    assert seen == tags


async def test_tags_last_and_n_zero(client):
    await tag_all(client, "app", ["a", "b", "c"])
    assert (await (await client.get("/v2/app/tags/list?last=a")).json())["tags"] == ["b", "c"]
    assert (await (await client.get("/v2/app/tags/list?n=1&last=b")).json())["tags"] == ["c"]
    r = await client.get("/v2/app/tags/list?n=0")
    assert (await r.json())["tags"] == [] and "Link" not in r.headers
    r = await client.get("/v2/app/tags/list?n=2")
    assert (await r.json())["tags"] == ["a", "b"]
    assert r.headers["Link"] == '</v2/app/tags/list?n=2&last=b>; rel="next"'


@pytest.mark.parametrize("n", ["-1", "x", "%C2%B2", "9" * 5000])
async def test_tags_bad_n(client, n):
    await tag_all(client, "app", ["a"])
    r = await client.get(f"/v2/app/tags/list?n={n}")
    assert r.status == 400 and await error_code(r) == "PAGINATION_NUMBER_INVALID"


async def test_tags_of_unknown_repository(client):
    r = await client.get("/v2/ghost/tags/list")
    assert r.status == 404 and await error_code(r) == "NAME_UNKNOWN"


async def test_tags_of_repository_without_tags(client):
    await upload_blob(client, "blobsonly", b"x")
    assert await (await client.get("/v2/blobsonly/tags/list")).json() == {"name": "blobsonly", "tags": []}


async def test_catalog(client):
    for repo in ("zeta", "library/redis", "library/debian", "a/b/c"):
        await upload_blob(client, repo, b"x")
    r = await client.get("/v2/_catalog")
    assert await r.json() == {"repositories": ["a/b/c", "library/debian", "library/redis", "zeta"]}
    r = await client.get("/v2/_catalog?n=2")
    assert (await r.json())["repositories"] == ["a/b/c", "library/debian"]
    assert r.headers["Link"] == '</v2/_catalog?n=2&last=library%2Fdebian>; rel="next"'
    r = await client.get("/v2/_catalog?n=2&last=library/debian")
    assert (await r.json())["repositories"] == ["library/redis", "zeta"]
    assert "Link" not in r.headers


async def test_nested_repository_and_parent_are_distinct(client):
    await upload_blob(client, "a", b"parent")
    await upload_blob(client, "a/b", b"child")
    assert (await (await client.get("/v2/_catalog")).json())["repositories"] == ["a", "a/b"]
    assert (await client.head(f"/v2/a/blobs/{sha256(b'child')}")).status == 404


async def push_referrer(client, repo, subject_digest, subject_size, artifact_type=None, config_type=None,
                        annotations=None):
    config = await upload_blob(client, repo, b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": config_type or "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
           "layers": [],
           "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size}}
    if artifact_type:
        doc["artifactType"] = artifact_type
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc).encode()
    r = await client.put(f"/v2/{repo}/manifests/{sha256(data)}", data=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    assert r.headers["OCI-Subject"] == subject_digest
    return sha256(data), data


async def test_referrers(client):
    subject, manifest = await push_image(client, "app", "v1")
    sig, sig_data = await push_referrer(client, "app", subject, len(manifest), "application/vnd.example.sig",
                                        annotations={"org.example.k": "v"})
    sbom, _ = await push_referrer(client, "app", subject, len(manifest), config_type="application/vnd.example.sbom")
    r = await client.get(f"/v2/app/referrers/{subject}")
    assert r.status == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    index = await r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in index["manifests"]}
    assert set(by_digest) == {sig, sbom}
    assert by_digest[sig] == {"mediaType": OCI_MANIFEST, "digest": sig, "size": len(sig_data),
                              "artifactType": "application/vnd.example.sig",
                              "annotations": {"org.example.k": "v"}}
    assert by_digest[sbom]["artifactType"] == "application/vnd.example.sbom"

    r = await client.get(f"/v2/app/referrers/{subject}?artifactType=application/vnd.example.sig")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in (await r.json())["manifests"]] == [sig]


async def test_referrers_paginate(client, monkeypatch):
    import registry.referrers
    monkeypatch.setattr(registry.referrers, "PAGE_ENTRIES", 2)
    subject, manifest = await push_image(client, "app", "v1")
    pushed = set()
    for i in range(5):
        digest, _ = await push_referrer(client, "app", subject, len(manifest), "application/vnd.example.sig",
                                        annotations={"n": str(i)})
        pushed.add(digest)
    await push_referrer(client, "app", subject, len(manifest), "application/vnd.example.other")
    seen, url = [], f"/v2/app/referrers/{subject}?artifactType=application/vnd.example.sig"
    while url:
        r = await client.get(url)
        page = (await r.json())["manifests"]
        assert 1 <= len(page) <= 2
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        seen += [d["digest"] for d in page]
        link = r.headers.get("Link")
        url = link[1:link.index(">")] if link else None
    assert sorted(seen) == sorted(pushed) and len(seen) == 5


async def test_referrer_pushed_before_its_subject(client):
    missing = sha256(b"subject not pushed yet")
    ref, _ = await push_referrer(client, "app", missing, 100, "application/vnd.example.sig")
    r = await client.get(f"/v2/app/referrers/{missing}")
    assert [d["digest"] for d in (await r.json())["manifests"]] == [ref]


async def test_referrers_empty_not_404(client):
    r = await client.get(f"/v2/nothing/referrers/{sha256(b'x')}")
    assert r.status == 200
    assert (await r.json())["manifests"] == []


async def test_referrers_bad_digest(client):
    r = await client.get("/v2/app/referrers/sha256:nothex")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_deleting_referrer_removes_it_from_listing(client):
    subject, manifest = await push_image(client, "app", "v1")
    sig, _ = await push_referrer(client, "app", subject, len(manifest), "application/vnd.example.sig")
    assert (await client.delete(f"/v2/app/manifests/{sig}")).status == 202
    assert (await (await client.get(f"/v2/app/referrers/{subject}")).json())["manifests"] == []


async def raw_request(client, method: str, path: str) -> tuple[int, bytes]:
    """Send `path` byte for byte (no client-side normalisation of `..` or `//`)."""
    import asyncio
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("name", ["Upper", "a/../b", "..", "a/%2E%2E/b", "a//b", "-lead", "a/_layers",
                                  "x" * 256, "a/.hidden", "a__-b", "a/b/"])
async def test_invalid_names(client, config, name):
    for method, path in (("GET", f"/v2/{name}/tags/list"), ("POST", f"/v2/{name}/blobs/uploads/"),
                         ("GET", f"/v2/{name}/manifests/latest"), ("PUT", f"/v2/{name}/manifests/latest")):
        status, body = await raw_request(client, method, path)
        assert status == 400, (method, path, status)
        assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
    assert list((config.root / "repositories").iterdir()) == []
    assert list((config.root / "uploads").iterdir()) == []


async def test_catalog_pages_follow_name_order_through_nested_repositories(client):
    names = ["a", "a/c", "a-b", "a.b", "a/c/d", "b"]
    for name in names:
        await upload_blob(client, name, b"x")
    url, seen = "/v2/_catalog?n=2", []
    while url:
        r = await client.get(url)
        seen += (await r.json())["repositories"]
        url = r.headers.get("Link", "").partition(">")[0][1:]
    assert seen == sorted(names)
    assert (await (await client.get("/v2/_catalog?n=0")).json())["repositories"] == []
    assert (await client.get("/v2/_catalog?n=x")).status == 400
