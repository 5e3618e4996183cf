import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from registry.app import make_app
from registry.config import Config
from registry.serve import handler_settings
from tests.support import isolation
from tests.support.client import sha256
from tests.support.paths import REPO
from tests.support.seaweedfs import S3Bucket, SeaweedFS

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

_guard: dict = {}


def pytest_configure(config):
    """Before any fixture runs: remember the user's real locations, then point every per-user
    variable of this process (and so of every server and client it starts) at a scratch folder."""
    real = dict(os.environ)
    _guard["watched"] = isolation.watched_locations(real)
    _guard["home"] = Path(real.get("HOME") or Path.home())
    _guard["before"] = isolation.Snapshot.take(_guard["watched"], _guard["home"], REPO)
    _guard["scratch"] = scratch = Path(tempfile.mkdtemp(prefix="kura-tests-"))
    isolation.apply(isolation.isolated_environment(scratch), os.environ.__setitem__,
                    lambda name: os.environ.pop(name, None))


def pytest_sessionfinish(session):
    """Fail the run if anything was written to the user's real data or the repository."""
    if "before" not in _guard:
        return
    shutil.rmtree(_guard["scratch"], ignore_errors=True)
    after = isolation.Snapshot.take(_guard["watched"], _guard["home"], REPO)
    changes = after.changes_since(_guard["before"])
    if changes:
        writer = session.config.get_terminal_writer()
        writer.line("tests wrote outside their temporary directories:", red=True, bold=True)
        for change in changes[:50]:
            writer.line(f"  {change}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """Each test gets its own HOME, XDG_* and DOCKER_CONFIG."""
    isolation.apply(isolation.isolated_environment(tmp_path / "user"), monkeypatch.setenv,
                    lambda name: monkeypatch.delenv(name, raising=False))


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """One real S3 server (SeaweedFS) for the whole run, started the first time a test asks.
    Its log is `<tmp>/seaweedfs0/weed.log`."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_bucket(seaweedfs, request) -> S3Bucket:
    """A fresh, empty bucket for each test module, named after it."""
    return seaweedfs.new_bucket(request.module.__name__)


@pytest.fixture
def config(tmp_path):
    return replace(Config(), root=tmp_path / "data", access_log=False)


async def serve_app(aiohttp_client, config: Config, app=None):
    """A test client of make_app(config) (or of `app`, built from `config`), served with the
    protocol settings of `kura serve`."""
    server = TestServer(app if app is not None else make_app(config))
    await server.start_server(**handler_settings(config))
    return await aiohttp_client(server)


@pytest.fixture
async def client(aiohttp_client, config):
    return await serve_app(aiohttp_client, config)


@pytest.fixture
def make_client(aiohttp_client, config):
    """Build a client for a variant of the default config."""
    async def build(**changes):
        return await serve_app(aiohttp_client, replace(config, **changes))
    return build


async def upload_blob(client, repo: str, data: bytes) -> str:
    digest = sha256(data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data)
    assert r.status == 201, await r.text()
    return digest


def image_manifest(config_digest: str, config_size: int, layers=(), **extra) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                   for d, s in layers],
    }
    doc.update(extra)
    return json.dumps(doc).encode()


async def push_image(client, repo: str, tag: str, layer: bytes = b"layer", config: bytes = b"{}",
                     **extra) -> tuple[str, bytes]:
    """Push a one-layer image; returns (manifest digest, manifest bytes)."""
    config_digest = await upload_blob(client, repo, config)
    layer_digest = await upload_blob(client, repo, layer)
    manifest = image_manifest(config_digest, len(config), [(layer_digest, len(layer))], **extra)
    r = await client.put(f"/v2/{repo}/manifests/{tag}", data=manifest,
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return r.headers["Docker-Content-Digest"], manifest


async def error_code(response) -> str:
    body = await response.json(content_type=None)
    assert set(body) == {"errors"} and body["errors"], body
    return body["errors"][0]["code"]
