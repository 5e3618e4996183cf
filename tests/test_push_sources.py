"""puller/sources.py: the blob checks a push starts before it imports its HTTP stack."""

import hashlib
import json
import subprocess
import sys
import threading

import pytest

from ocispec.digest import Digest
from puller.sources import BlobChecks, PushError, Source, verify_file
from tests.support.cli import client_env
from tests.support.paths import REPO
from tests.support.servers import free_port

INDEX = "application/vnd.oci.image.index.v1+json"


def put(layout, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def test_a_manifest_that_names_itself_is_refused_not_walked_for_ever(tmp_path):
    """Only a corrupt file can list its own digest; the early walk reads each manifest once and
    the push refuses the manifest, before any request (nobody listens on the port)."""
    layout = tmp_path / "layout"
    placeholder = put(layout, b"{}")
    path = layout / "blobs" / "sha256" / placeholder[7:]
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                                "manifests": [{"mediaType": INDEX, "digest": placeholder, "size": 2}]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": INDEX, "digest": placeholder, "size": 2, "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
    result = subprocess.run([sys.executable, "-m", "kura", "push", "-q", "--store", str(tmp_path / "store"),
                             f"oci:{layout}:1", f"127.0.0.1:{free_port()}/x:1"], cwd=REPO, env=client_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr == f"kura: local manifest {placeholder} is corrupt; refusing to push it\n"
    assert Source(layout, {"digest": placeholder}).blob_digests() == []


def test_each_blob_is_checked_once_and_a_corrupt_one_named(tmp_path):
    good = put(tmp_path, b"a" * 3_000_000)
    bad = put(tmp_path, b"b" * 10)
    (tmp_path / "blobs" / "sha256" / bad[7:]).write_bytes(b"c" * 10)
    source = Source(tmp_path, {})
    checks = BlobChecks()
    try:
        first = checks.check(source.blob(good), Digest.parse(good))
        assert checks.check(source.blob(good), Digest.parse(good)) is first
        assert first.result(timeout=30) == 3_000_000
        with pytest.raises(PushError, match=f"local blob {bad} is corrupt .*nothing was sent"):
            checks.check(source.blob(bad), Digest.parse(bad)).result(timeout=30)
    finally:
        checks.close()


def test_a_stopped_check_gives_up_at_its_next_read(tmp_path):
    digest = put(tmp_path, b"x" * (3 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Exception) as caught:
        verify_file(Source(tmp_path, {}).blob(digest), Digest.parse(digest), stop)
    assert type(caught.value).__name__ == "_Stopped"
