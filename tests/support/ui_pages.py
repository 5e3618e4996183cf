"""What the web UI's tests push and how they read its pages (tests/test_ui.py, test_s3_api.py)."""

from __future__ import annotations

import json
import re

from tests.conftest import OCI_INDEX, OCI_MANIFEST, push_image, upload_blob

HOSTILE = "<script>alert(1)</script>"


def image_config(os: str = "linux", arch: str = "amd64", **run) -> bytes:
    return json.dumps({
        "os": os, "architecture": arch, "created": "2026-01-02T03:04:05Z",
        "config": {"Cmd": ["redis-server"], "Env": ["PATH=/usr/bin", "GREETING=hello"], "WorkingDir": "/data",
                   "ExposedPorts": {"6379/tcp": {}}, **run},
        "history": [{"created": "2026-01-02T03:04:05Z", "created_by": "/bin/sh -c apt-get install redis"},
                    {"created": "2026-01-02T03:04:06Z", "created_by": 'CMD ["redis-server"]', "empty_layer": True}],
        "rootfs": {"type": "layers", "diff_ids": []},
    }).encode()


async def seed(client) -> dict[str, str]:
    """team/app:v1 (an image with a referrer), team/multi:latest (an index of two platforms),
    public/hello:1; returns their digests."""
    digests = {}
    digests["app"], _ = await push_image(client, "team/app", "v1", layer=b"app layer", config=image_config())
    await push_image(client, "team/app", "v2", layer=b"app layer 2", config=image_config())
    empty = await upload_blob(client, "team/app", b"{}")
    sbom = await upload_blob(client, "team/app", b'{"spdxVersion": "SPDX-2.3"}')
    referrer = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": sbom, "size": 27}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": digests["app"], "size": 1},
        "annotations": {"org.example.note": HOSTILE},
    }).encode()
    r = await client.put("/v2/team/app/manifests/sbom", data=referrer, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    digests["sbom"] = r.headers["Docker-Content-Digest"]
    children = []
    for arch in ("amd64", "arm64"):
        config = image_config(arch=arch)
        digest, manifest = await push_image(client, "team/multi", f"only-{arch}", layer=arch.encode(), config=config)
        children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                         "platform": {"os": "linux", "architecture": arch}})
        digests[arch] = digest
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    r = await client.put("/v2/team/multi/manifests/latest", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201, await r.text()
    digests["index"] = r.headers["Docker-Content-Digest"]
    digests["public"], _ = await push_image(client, "public/hello", "1", config=image_config())
    return digests


def csrf_of(page: str) -> str:
    """The form token of the session a page was rendered for (every page has it in a meta tag)."""
    return re.search(r'<meta name="kura-csrf" content="([^"]+)">', page).group(1)


async def page(client, path: str, status: int = 200) -> str:
    r = await client.get(path)
    text = await r.text()
    assert r.status == status, text
    assert r.headers["Content-Type"].startswith("text/html")
    return text
