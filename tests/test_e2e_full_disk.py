"""A full disk, for real: `kura serve` on a small tmpfs. The client gets 507 in the spec's
error format, the upload's bytes are removed, the log has one line per failure (no
traceback), and once space is freed the same push works and fsck is clean."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.support.mounts import fill, free_bytes, tmpfs
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import start_kura, stop

pytestmark = pytest.mark.e2e
MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def call(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request, errors included."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def storage_full(status: int, body: bytes, code: str) -> None:
    assert status == 507, (status, body)
    error = json.loads(body)["errors"][0]
    assert error["code"] == code and "storage is full" in error["message"], error


def fsck_clean(root) -> None:
    result = subprocess.run([sys.executable, "-m", "kura", "fsck", "--root", str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def failure_lines(log) -> list[str]:
    text = log.read_text()
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if "storage full" in line]


@pytest.fixture
def volume(tmp_path):
    with tmpfs(tmp_path / "vol", "8m") as mounted:
        yield mounted


def test_upload_on_a_full_disk(volume, tmp_path):
    root, log = volume / "data", tmp_path / "kura.log"
    server = start_kura(root, None, log=log)
    try:
        base = f"{server.url}/v2/full"
        (volume / "filler").write_bytes(bytes(6 * MIB))  # leaves about 2 MiB
        room = free_bytes(volume)
        blob = os.urandom(5 * MIB)

        # Chunked: the first chunk fits, the second does not.
        status, headers, _ = call("POST", f"{base}/blobs/uploads/")
        location = server.url + headers["Location"]
        status, _, body = call("PATCH", location, blob[:MIB], {"Content-Type": "application/octet-stream"})
        assert status == 202, body
        status, _, body = call("PATCH", location, blob[MIB:], {"Content-Type": "application/octet-stream"})
        storage_full(status, body, "BLOB_UPLOAD_INVALID")
        assert call("GET", location)[0] == 404  # the session and its bytes are gone...
        assert os.listdir(root / "uploads") == []
        assert free_bytes(volume) >= room  # ...and so is the space they took

        # Monolithic (POST with the digest and the body).
        status, _, body = call("POST", f"{base}/blobs/uploads/?digest={sha256(blob)}", blob,
                               {"Content-Type": "application/octet-stream"})
        storage_full(status, body, "BLOB_UPLOAD_INVALID")
        assert os.listdir(root / "tmp") == [] and free_bytes(volume) >= room

        assert len(failure_lines(log)) == 2, log.read_text()

        (volume / "filler").unlink()
        status, headers, _ = call("POST", f"{base}/blobs/uploads/")
        location = server.url + headers["Location"]
        status, _, body = call("PUT", f"{location}?digest={sha256(blob)}", blob,
                               {"Content-Type": "application/octet-stream"})
        assert status == 201, body
        assert call("GET", f"{base}/blobs/{sha256(blob)}")[2] == blob
    finally:
        stop(server)
    fsck_clean(root)


def test_manifest_put_on_a_full_disk(volume, tmp_path):
    root, log = volume / "data", tmp_path / "kura.log"
    server = start_kura(root, None, log=log)
    try:
        base = f"{server.url}/v2/full"
        config, layer = b"{}", os.urandom(4096)
        for data in (config, layer):
            status, _, body = call("POST", f"{base}/blobs/uploads/?digest={sha256(data)}", data,
                                   {"Content-Type": "application/octet-stream"})
            assert status == 201, body
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                        "size": len(layer)}],
        }).encode()
        fill(volume / "filler")
        status, _, body = call("PUT", f"{base}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        storage_full(status, body, "UNKNOWN")
        assert call("GET", f"{base}/manifests/v1", headers={"Accept": OCI_MANIFEST})[0] == 404
        assert os.listdir(root / "tmp") == []  # nothing half-written left behind
        assert len(failure_lines(log)) == 1, log.read_text()

        (volume / "filler").unlink()
        status, _, body = call("PUT", f"{base}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert status == 201, body
        assert call("GET", f"{base}/manifests/v1", headers={"Accept": OCI_MANIFEST})[2] == manifest
    finally:
        stop(server)
    fsck_clean(root)


def test_skopeo_reports_insufficient_storage(volume, tmp_path):
    """What a real client shows: skopeo (like docker) drops the body of a 5xx answer and
    prints its status line, so the status itself must say what is wrong."""
    require_shared()
    root = volume / "data"
    server = start_kura(root, None, log=tmp_path / "kura.log")
    try:
        fill(volume / "filler")
        result = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                                 f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64",
                                 f"docker://{server.host}/busybox:1"], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "507 Insufficient Storage" in result.stderr, result.stderr
        assert os.listdir(root / "uploads") == []  # no session half-created
    finally:
        stop(server)
