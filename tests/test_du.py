"""`kura du`: per repository manifests, tags, bytes referenced and bytes only it holds; store totals."""

import json
import os
import subprocess
import sys
import time

from ocispec.digest import Digest
from registry.context import STORAGE
from storage import FilesystemDriver
from storage.layout import Layout
from tests.conftest import push_image, upload_blob
from tests.support.paths import REPO

BASE = b"B" * 5000
APP = b"A" * 700


def kura(*args):
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


async def shared_layers(client):
    """lib/base and lib/app share the base layer; lib/app also has a blob no manifest uses."""
    _, base_manifest = await push_image(client, "lib/base", "1", layer=BASE, config=b'{"a":1}')
    r = await client.put("/v2/lib/base/manifests/latest", data=base_manifest,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 201
    _, app_manifest = await push_image(client, "lib/app", "1", layer=APP, config=b'{"b":22}')
    await upload_blob(client, "lib/app", BASE)
    orphan = Digest.parse(await upload_blob(client, "lib/app", b"O" * 33))
    # Stored and linked two hours ago: past the collection's grace period, whose dry run
    # is the reclaimable figure.
    layout = Layout(client.server.app[STORAGE].root)
    hours_ago = time.time() - 7200
    for path in (layout.blob(orphan), layout.layer_link("lib/app", orphan)):
        os.utime(path, (hours_ago, hours_ago))
    return len(base_manifest), len(app_manifest)


async def test_du_json_on_shared_layers(client, config):
    base_manifest, app_manifest = await shared_layers(client)
    result = kura("du", "--root", str(config.root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["repositories"] == [
        {"name": "lib/app", "manifests": 1, "tags": 1, "referenced_bytes": 700 + 8 + app_manifest + 5000 + 33,
         "exclusive_bytes": 700 + 8 + app_manifest + 33},
        {"name": "lib/base", "manifests": 1, "tags": 2, "referenced_bytes": 5000 + 7 + base_manifest,
         "exclusive_bytes": 7 + base_manifest},
    ]
    assert report["store"] == {"blobs": 7, "bytes": 5000 + 700 + 7 + 8 + base_manifest + app_manifest + 33,
                               "reclaimable_blobs": 1, "reclaimable_bytes": 33}
    assert report["quotas"] == []


async def test_du_text(client, config):
    await shared_layers(client)
    result = kura("du", "--root", str(config.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "MANIFESTS", "TAGS", "REFERENCED", "ONLY", "HERE"]
    assert lines[1].split()[:3] == ["lib/app", "1", "1"]
    assert lines[2].split()[:3] == ["lib/base", "1", "2"]
    assert "reclaimable by the next collection: 1 blob(s), 33 B" in result.stdout


async def test_du_refreshes_and_shows_quotas(make_client, config, tmp_path):
    from registry.config import make_quota
    quotas = (make_quota(["lib/**"], 100_000),)
    client = await make_client(quotas=quotas)
    base_manifest, app_manifest = await shared_layers(client)
    used = 5000 + 700 + 7 + 8 + base_manifest + app_manifest + 33
    driver = FilesystemDriver(config.root)
    async with driver.repository_lock("lib/app"):
        await driver.delete_repository("lib/app")
    assert await driver.usage_ledger(quotas[0].ledger).total() == used  # stale until recounted
    toml = tmp_path / "kura.toml"
    toml.write_text(f'[storage]\nroot = "{config.root}"\n[[quota]]\nrepositories = ["lib/**"]\nmax_bytes = 100000\n')
    result = kura("du", "--config", str(toml), "--json")
    assert result.returncode == 0, result.stderr
    now = 5000 + 7 + base_manifest
    assert json.loads(result.stdout)["quotas"] == [{"repositories": ["lib/**"], "max_bytes": 100_000,
                                                    "used_bytes": now}]
    assert await driver.usage_ledger(quotas[0].ledger).total() == now
    text = kura("du", "--config", str(toml)).stdout
    assert f"quota lib/**: {now} of 100000 bytes used" in text


def test_du_on_an_empty_or_missing_store(tmp_path):
    FilesystemDriver(tmp_path / "empty")
    result = kura("du", "--root", str(tmp_path / "empty"), "--json")
    assert json.loads(result.stdout)["store"] == {"blobs": 0, "bytes": 0, "reclaimable_blobs": 0,
                                                  "reclaimable_bytes": 0}
    missing = kura("du", "--root", str(tmp_path / "missing"))
    assert missing.returncode == 1 and missing.stderr.startswith("kura: ") and "not a Kura store" in missing.stderr
    assert not (tmp_path / "missing").exists()
