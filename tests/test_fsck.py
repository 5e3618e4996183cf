"""`kura fsck`: a clean store passes; each kind of damage is reported with a non-zero exit."""

import json
import subprocess
import sys

import pytest

from storage import FilesystemDriver
from storage.fsck import fsck as fsck_driver
from tests.conftest import push_image
from tests.support.paths import REPO


@pytest.fixture
async def store(client, config):
    digest, _ = await push_image(client, "app", "v1", layer=b"layer-bytes")
    return config.root, digest


async def fsck(root):
    return await fsck_driver(FilesystemDriver(root))


def run_fsck(root):
    return subprocess.run([sys.executable, "-m", "kura", "fsck", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


async def test_clean_store(store):
    root, _ = store
    report = await fsck(root)
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
    problems = (await fsck(root)).problems
    assert any("points at a missing blob" in p for p in problems)
    assert any("references missing blob" in p for p in problems)


async def test_tag_to_missing_manifest(store):
    root, digest = store
    (root / "repositories" / "app" / "_manifests" / "revisions" / "sha256" / digest.split(":")[1]).unlink()
    assert any("tag v1 points at missing manifest" in p for p in (await fsck(root)).problems)


async def test_torn_link(store):
    root, digest = store
    (root / "repositories" / "app" / "_manifests" / "tags" / "v1").write_text("sha256:abc")
    assert any("tag v1 is unreadable" in p for p in (await fsck(root)).problems)


async def test_temp_files_are_only_a_note(store):
    root, _ = store
    (root / "tmp" / "x.tmp").write_bytes(b"half")
    report = await fsck(root)
    assert report.ok and any("temp file" in n for n in report.notes)


def test_not_a_store(tmp_path):
    result = run_fsck(tmp_path)
    assert result.returncode == 1 and "not a Kura store" in result.stdout


async def test_referrer_without_manifest(client, config):
    d = config.root / "repositories" / "app" / "_referrers" / "sha256" / ("0" * 64)
    d.mkdir(parents=True)
    (d / ("sha256-" + "1" * 64)).write_text(json.dumps({"digest": "sha256:" + "1" * 64}))
    (config.root / "repositories" / "app" / "_layers").mkdir()
    assert any("referrer entry sha256:" + "1" * 64 in p for p in (await fsck(config.root)).problems)


def write_manifest_behind_the_api(root, repo: str, tag: str, document: dict, media_type: str) -> str:
    """Store a manifest straight into the filesystem layout, as an older Kura might have."""
    from ocispec.digest import Digest
    from storage.layout import Layout

    data = json.dumps(document).encode()
    digest = Digest.of_bytes(data)
    layout = Layout(root)
    for path, content in ((layout.blob(digest), data),
                          (layout.revision_link(repo, digest),
                           json.dumps({"digest": str(digest), "mediaType": media_type}).encode()),
                          (layout.tag(repo, tag), str(digest).encode())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return str(digest)


def ambiguous_document(root, image_digest: str) -> dict:
    """An image manifest that also lists `manifests`; every reference exists."""
    data = next((root / "blobs").rglob(image_digest.split(":")[1])).read_bytes()
    image = json.loads(data)
    return {**image, "manifests": [{"mediaType": image["mediaType"], "digest": image_digest, "size": len(data)}]}


async def test_ambiguous_manifest_already_in_the_store(store):
    root, image_digest = store
    document = ambiguous_document(root, image_digest)
    digest = write_manifest_behind_the_api(root, "app", "ambiguous", document, document["mediaType"])
    problems = (await fsck(root)).problems
    assert any(digest in p and "ambiguous" in p for p in problems), problems
    assert len(problems) == 1, problems  # the tag points at it: it is there, only invalid
    result = run_fsck(root)
    assert result.returncode == 1
    assert f"manifest {digest}" in result.stdout and "ambiguous" in result.stdout


async def test_stored_manifest_that_no_longer_parses_can_still_be_deleted(client, store):
    """With its tags and its referrer entry, so the store stays consistent."""
    from ocispec.digest import Digest
    from storage.layout import Layout

    root, image_digest = store
    document = ambiguous_document(root, image_digest)
    document["subject"] = document["manifests"][0]
    digest = write_manifest_behind_the_api(root, "app", "ambiguous", document, document["mediaType"])
    entry = Layout(root).referrer("app", Digest.parse(image_digest), Digest.parse(digest))
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"mediaType": document["mediaType"], "digest": digest, "size": 1}))
    assert len((await (await client.get(f"/v2/app/referrers/{image_digest}")).json())["manifests"]) == 1

    r = await client.delete(f"/v2/app/manifests/{digest}")
    assert r.status == 202, await r.text()
    assert (await client.get("/v2/app/manifests/ambiguous")).status == 404
    assert (await (await client.get(f"/v2/app/referrers/{image_digest}")).json())["manifests"] == []
    report = await fsck(root)
    assert report.ok, report.problems


async def test_revision_link_that_is_not_an_object(store):
    root, digest = store
    link = root / "repositories" / "app" / "_manifests" / "revisions" / "sha256" / digest.split(":")[1]
    for record in ("[]", '{"mediaType": 5}'):
        link.write_text(record)
        assert any(f"manifest link {digest} is unreadable" in p for p in (await fsck(root)).problems), record


async def test_what_only_the_filesystem_layout_shows(store):
    """Entries the driver never lists (so fsck sees them only through check_layout)."""
    root, digest = store
    blobs = root / "blobs" / "sha256"
    misfiled = next(p for p in blobs.rglob("*") if p.is_file() and p.read_bytes() == b"layer-bytes")
    wrong_prefix = blobs / ("00" if misfiled.name[:2] != "00" else "01")
    wrong_prefix.mkdir(exist_ok=True)
    (wrong_prefix / misfiled.name).write_bytes(b"layer-bytes")
    (blobs / "ab").mkdir(exist_ok=True)
    (blobs / "ab" / "not-a-digest").write_bytes(b"x")
    (root / "blobs" / "md5").mkdir()
    repository = root / "repositories" / "app"
    (repository / "_layers" / "sha256" / "junk").write_bytes(b"x")
    (repository / "_manifests" / "revisions" / "sha256" / "junk").write_bytes(b"x")
    subject = repository / "_referrers" / "sha256" / digest.split(":")[1]
    subject.mkdir(parents=True)
    (subject / "junk").write_bytes(b"x")
    report = await fsck(root)
    expected = [f"blob sha256:{misfiled.name} is filed under the wrong prefix: {wrong_prefix / misfiled.name}",
                f"stray file in blob store: {blobs / 'ab' / 'not-a-digest'}",
                f"stray file in blob store: {root / 'blobs' / 'md5'}",
                f"app: stray layer link {repository / '_layers' / 'sha256' / 'junk'}",
                f"app: stray manifest link {repository / '_manifests' / 'revisions' / 'sha256' / 'junk'}",
                f"app: stray referrer entry {subject / 'junk'}"]
    assert sorted(report.problems) == sorted(expected)
    assert report.blobs == 3  # the misfiled copy is not a blob the driver would serve
    result = run_fsck(root)
    assert result.returncode == 1 and f"{len(expected)} problem(s)" in result.stdout


async def test_upload_sessions_are_a_note(client, store):
    root, _ = store
    r = await client.post("/v2/app/blobs/uploads/")
    assert r.status == 202
    report = await fsck(root)
    assert report.ok and "1 upload session(s) in progress or abandoned" in report.notes


@pytest.mark.e2e
async def test_kura_fsck_on_an_s3_store(s3_bucket, tmp_path):
    """The same checks through the S3 driver: `kura fsck --config` with [storage] driver = "s3"."""
    import uuid

    from storage.s3 import S3Driver
    from storage.s3_objects import S3Location
    from tests.contract.helpers import digest_of
    from tests.contract.helpers import push_image as push_to_driver

    prefix = f"fsck-{uuid.uuid4().hex[:8]}"
    driver = S3Driver(S3Location(s3_bucket.endpoint, s3_bucket.region, s3_bucket.bucket, prefix,
                                 s3_bucket.access_key, s3_bucket.secret_key))
    await driver.open()
    await push_to_driver(driver, "app", "v1", b"{}", b"layer-bytes")
    config = tmp_path / "kura.toml"
    config.write_text(f'[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = "{s3_bucket.endpoint}"\n'
                      f'region = "{s3_bucket.region}"\nbucket = "{s3_bucket.bucket}"\nprefix = "{prefix}"\n'
                      f'access_key = "{s3_bucket.access_key}"\nsecret_key = "{s3_bucket.secret_key}"\n')

    def run():
        return subprocess.run([sys.executable, "-m", "kura", "fsck", "--config", str(config)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    result = run()
    assert result.returncode == 0 and result.stdout.endswith(
        "checked 3 blobs, 1 repositories, 1 manifests, 1 tags: ok\n"), result.stdout + result.stderr
    lie = digest_of(b"what the digest says")
    await driver.put_small_blob(b"something else", lie)
    result = run()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"PROBLEM: blob {lie} is corrupt" in result.stdout
    await driver.close()
