"""`kura repo delete NAME`: a whole repository goes at once (its blobs at the next collection)."""

import json
import os
import subprocess
import sys

from ocispec.digest import Digest
from storage import FilesystemDriver
from storage.filesystem import REPOSITORY_DELETE_STEPS
from storage.fsck import fsck
from storage.manifests import put_manifest
from tests.conftest import OCI_INDEX, OCI_MANIFEST, image_manifest, push_image, upload_blob
from tests.support.client import sha256
from tests.support.paths import REPO


def kura(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, **kwargs)


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kura: "), result.stderr
    return lines[0]


def blob_files(root) -> set[str]:
    return {path.name for path in (root / "blobs").rglob("*") if path.is_file()}


async def populate(client):
    """`app` (a tagged image, an index over it, a signature referring to it, a stray blob,
    an open upload), `app/sub` nested inside it, `other` sharing the layer."""
    digest, manifest = await push_image(client, "app", "v1", layer=b"shared-layer")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}]}).encode()
    r = await client.put("/v2/app/manifests/multi", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    config_digest = await upload_blob(client, "app", b"{}")
    signature = image_manifest(config_digest, 2, subject={"mediaType": OCI_MANIFEST, "digest": digest,
                                                          "size": len(manifest)})
    r = await client.put(f"/v2/app/manifests/{sha256(signature)}", data=signature,
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    await upload_blob(client, "app", b"stray")
    assert (await client.post("/v2/app/blobs/uploads/")).status == 202
    await push_image(client, "app/sub", "v1", layer=b"sub-layer")
    await push_image(client, "other", "v1", layer=b"shared-layer")
    return digest


async def catalog(client) -> list[str]:
    return (await (await client.get("/v2/_catalog")).json())["repositories"]


async def test_repo_delete(client, config):
    digest = await populate(client)
    root = config.root
    blobs = blob_files(root)
    result = kura("repo", "delete", "app", "--root", str(root), "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "deleted app: 2 tags, 3 manifests, 3 blob links, and its upload sessions"
    report = await fsck(FilesystemDriver(root))
    assert report.ok, report.problems
    assert await catalog(client) == ["app/sub", "other"]
    assert (await client.get("/v2/app/manifests/v1")).status == 404
    assert (await client.get(f"/v2/app/referrers/{digest}")).status in (200, 404)
    assert blob_files(root) == blobs  # the blobs wait for the garbage collection
    assert os.listdir(root / "uploads") == []
    assert (await client.get("/v2/other/manifests/v1")).status == 200
    assert (await client.get("/v2/app/sub/manifests/v1")).status == 200
    # The name is free again.
    await push_image(client, "app", "v2", layer=b"new")
    assert await catalog(client) == ["app", "app/sub", "other"]


async def test_unknown_or_invalid_name_is_one_line(client, config):
    await push_image(client, "app", "v1")
    assert "no repository 'nope'" in one_line_error(kura("repo", "delete", "nope", "--root", str(config.root),
                                                         "--yes"))
    assert "invalid repository name" in one_line_error(kura("repo", "delete", "Bad/../x", "--root",
                                                            str(config.root), "--yes"))
    assert "not a Kura store" in one_line_error(kura("repo", "delete", "app", "--root",
                                                     str(config.root / "nothing"), "--yes"))
    assert not (config.root / "nothing").exists()
    assert await catalog(client) == ["app"]


async def test_confirmation(client, config):
    await push_image(client, "app", "v1")
    root = str(config.root)
    # Not on a terminal and no --yes: refused, nothing touched.
    assert "--yes" in one_line_error(kura("repo", "delete", "app", "--root", root, stdin=subprocess.DEVNULL))
    assert await catalog(client) == ["app"]
    for answer, deleted in ((b"n\n", False), (b"y\n", True)):
        primary, secondary = os.openpty()
        try:
            process = subprocess.Popen([sys.executable, "-m", "kura", "repo", "delete", "app", "--root", root],
                                       cwd=REPO, stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.write(primary, answer)
            out, err = process.communicate(timeout=60)
        finally:
            os.close(primary)
            os.close(secondary)
        assert b"Delete repository app (1 tags, 1 manifests, 2 blob links)?" in out + err
        assert (process.returncode == 0) == deleted, (out, err)
        assert await catalog(client) == ([] if deleted else ["app"])


async def test_every_step_leaves_a_consistent_store(tmp_path):
    """A crash between any two steps of the removal leaves a store that fsck finds clean."""
    for stop in range(len(REPOSITORY_DELETE_STEPS) + 1):
        root = tmp_path / f"stop-{stop}"
        driver = FilesystemDriver(root)
        await build_repository(driver)
        async with driver.repository_lock("app"):
            for step in REPOSITORY_DELETE_STEPS[:stop]:
                driver._delete_repository_step("app", step)
        report = await fsck(FilesystemDriver(root))
        assert report.ok, (REPOSITORY_DELETE_STEPS[:stop], report.problems)
        names = await driver.list_repositories()
        assert "app/sub" in names
        assert ("app" in names) == (stop < REPOSITORY_DELETE_STEPS.index("layers") + 1)


async def build_repository(driver):
    async def one(data):
        yield data

    async def blob(repo, data):
        digest = Digest.parse(sha256(data))
        await driver.put_blob(repo, digest, one(data))
        return str(digest)

    for repo in ("app", "app/sub"):
        config_digest, layer = await blob(repo, b"{}"), await blob(repo, b"layer")
        manifest = image_manifest(config_digest, 2, [(layer, 5)])
        digest, _ = await put_manifest(driver, repo, manifest, OCI_MANIFEST, tags=("v1", "v2"))
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": str(digest), "size": len(manifest)}]}).encode()
    await put_manifest(driver, "app", index, OCI_INDEX, tags=("multi",))
    signature = image_manifest(config_digest, 2, subject={"mediaType": OCI_MANIFEST, "digest": str(digest),
                                                          "size": len(manifest)})
    await put_manifest(driver, "app", signature, OCI_MANIFEST, tags=("sig",))
    await driver.create_upload("app")


async def test_a_busy_repository_is_one_line(client, config, monkeypatch, capsys):
    import asyncio

    import storage.filesystem
    from registry.cli import main

    await push_image(client, "app", "v1")
    monkeypatch.setattr(storage.filesystem, "LOCK_WAIT_SECONDS", 0.2)
    async with FilesystemDriver(config.root).repository_lock("app"):  # a push holds it
        code = await asyncio.to_thread(main, ["repo", "delete", "app", "--root", str(config.root), "--yes"])
    assert code == 1
    assert capsys.readouterr().err == "kura: repository app is busy (a push or delete holds it); retry\n"
    assert await catalog(client) == ["app"]
