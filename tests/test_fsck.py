"""`kura fsck`: a clean store passes; each kind of damage is reported with a non-zero exit."""

import json
import subprocess
import sys

import pytest

from storage.fsck import fsck
from tests.conftest import push_image
from tests.support.paths import REPO


@pytest.fixture
async def store(client, config):
    digest, _ = await push_image(client, "app", "v1", layer=b"layer-bytes")
    return config.root, digest


def run_fsck(root):
    return subprocess.run([sys.executable, "-m", "kura", "fsck", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


async def test_clean_store(store):
    root, _ = store
    report = fsck(root)
    assert report.ok, report.problems
    assert (report.repositories, report.manifests, report.tags) == (1, 1, 1)
    assert report.blobs == 3
    result = run_fsck(root)
    assert result.returncode == 0, result.stdout
    assert "ok" in result.stdout


async def test_corrupt_blob(store):
    root, _ = store
    blob = next(p for p in (root / "blobs").rglob("*") if p.is_file() and p.read_bytes() == b"layer-bytes")
    blob.write_bytes(b"layer-bytez")
    result = run_fsck(root)
    assert result.returncode == 1
    assert f"blob sha256:{blob.name} is corrupt" in result.stdout


async def test_missing_blob(store):
    root, _ = store
    blob = next(p for p in (root / "blobs").rglob("*") if p.is_file() and p.read_bytes() == b"layer-bytes")
    blob.unlink()
    problems = fsck(root).problems
    assert any("points at a missing blob" in p for p in problems)
    assert any("references missing blob" in p for p in problems)


async def test_tag_to_missing_manifest(store):
    root, digest = store
    (root / "repositories" / "app" / "_manifests" / "revisions" / "sha256" / digest.split(":")[1]).unlink()
    assert any("tag v1 points at missing manifest" in p for p in fsck(root).problems)


async def test_torn_link(store):
    root, digest = store
    (root / "repositories" / "app" / "_manifests" / "tags" / "v1").write_text("sha256:abc")
    assert any("tag v1 is unreadable" in p for p in fsck(root).problems)


async def test_temp_files_are_only_a_note(store):
    root, _ = store
    (root / "tmp" / "x.tmp").write_bytes(b"half")
    report = fsck(root)
    assert report.ok and any("temp file" in n for n in report.notes)


def test_not_a_store(tmp_path):
    result = run_fsck(tmp_path)
    assert result.returncode == 1 and "not a Kura store" in result.stdout


async def test_referrer_without_manifest(client, config):
    d = config.root / "repositories" / "app" / "_referrers" / "sha256" / ("0" * 64)
    d.mkdir(parents=True)
    (d / ("sha256-" + "1" * 64)).write_text(json.dumps({"digest": "sha256:" + "1" * 64}))
    (config.root / "repositories" / "app" / "_layers").mkdir()
    assert any("referrer entry sha256:" + "1" * 64 in p for p in fsck(config.root).problems)
