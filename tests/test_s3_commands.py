"""`kura du`, `kura gc`, `kura fsck` and `kura repo delete` on an S3 store (--config with
[storage] driver = "s3"): the same code as on the filesystem, through the driver interface."""

from __future__ import annotations

import json
import uuid

import pytest

from storage.manifests import READ_LIMIT, delete_manifest
from storage.s3 import S3Driver
from storage.s3_objects import S3Location
from tests.contract.helpers import digest_of, push_image
from tests.support.cli import run_kura
from tests.support.kura_s3 import storage_toml

pytestmark = pytest.mark.e2e


async def test_du_gc_fsck_and_repo_delete_on_s3(s3_bucket, tmp_path):
    prefix = f"cmd-{uuid.uuid4().hex[:8]}"
    driver = S3Driver(S3Location(s3_bucket.endpoint, s3_bucket.region, s3_bucket.bucket, prefix,
                                 s3_bucket.access_key, s3_bucket.secret_key))
    await driver.open()
    kept_layer, dropped_layer = b"kept layer " * 1000, b"dropped layer " * 3000
    await push_image(driver, "team/app", "v1", b'{"n":1}', kept_layer)
    dropped, _ = await push_image(driver, "team/app", None, b'{"n":2}', dropped_layer)
    await delete_manifest(driver, "team/app", dropped, READ_LIMIT)
    config = tmp_path / "kura.toml"
    config.write_text(storage_toml(s3_bucket, root=tmp_path / "local", prefix=prefix) + "[gc]\ngrace_seconds = 0\n")

    ran = await run_kura("du", "--config", str(config), "--json")
    assert ran.returncode == 0, ran.stderr
    usage = json.loads(ran.stdout)
    assert [(row["name"], row["manifests"], row["tags"]) for row in usage["repositories"]] == [("team/app", 1, 1)]
    # What the collection will free: the deleted manifest, its config and its layer.
    assert usage["store"]["reclaimable_blobs"] == 3

    ran = await run_kura("gc", "--config", str(config), "--json")
    assert ran.returncode == 0, ran.stderr
    assert dropped_layer and str(digest_of(dropped_layer)) in {blob["digest"] for blob in json.loads(ran.stdout)["blobs"]}
    assert await driver.stat_blob(digest_of(dropped_layer)) is None
    assert await driver.stat_blob(digest_of(kept_layer)) is not None

    ran = await run_kura("fsck", "--config", str(config))
    assert ran.returncode == 0 and ran.stdout.endswith("ok\n"), ran.stdout + ran.stderr

    ran = await run_kura("repo", "delete", "team/app", "--config", str(config), "--yes")
    assert ran.returncode == 0, ran.stderr
    assert await driver.list_repositories() == []
    await driver.close()


async def test_commands_on_an_unreachable_s3_store_fail_in_one_line(tmp_path):
    config = tmp_path / "kura.toml"
    config.write_text('[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = "http://127.0.0.1:9"\nbucket = "gone"\n'
                      'access_key = "a"\nsecret_key = "b"\n')
    for command in (["du"], ["gc"], ["fsck"], ["repo", "delete", "x", "--yes"]):
        ran = await run_kura(*command, "--config", str(config))
        assert ran.returncode == 1, (command, ran.stdout, ran.stderr)
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kura: ") and "object store" in lines[0], (command, ran.stderr)
