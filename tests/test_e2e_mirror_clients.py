"""Real clients configured to use a registry as their mirror for docker.io: podman and skopeo
(registries.conf), dockerd (registry-mirrors), containerd's ctr (hosts.toml), and containerd's
requests made by hand. Here the mirror is a plain Kura holding the shared redis image as
library/redis:7 and docker.io/library/redis:7, and docker.io's "real" location is a port where
nothing listens: a pull that succeeds went through the mirror. These pin what each client asks
a mirror for, which the pull-through cache must answer:

  client       mirror given as          requests                                     query
  podman,      host:port                GET /v2/, GET /v2/library/redis/manifests/7,  none
  skopeo                                GET .../blobs/<digest>
               host:port/docker.io      the same under /v2/docker.io/library/redis/   none
  docker       http://host:port         GET /v2/, HEAD /v2/library/redis/manifests/7, none
               (a path is refused)      GET .../manifests/<digest>, GET .../blobs/...
  ctr          http://host:port         HEAD /v2/library/redis/manifests/7, GET       ?ns=docker.io
                                        .../manifests/<digest>, GET .../blobs/...;
                                        no GET /v2/
               http://host:port/v2/docker.io (override_path)
                                        the same under /v2/docker.io/library/redis/   ?ns=docker.io
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.app import make_app
from tests.conftest import serve_app
from tests.support.cli import run_kura
from tests.support.layouts import reachable_blobs, tag_digest
from tests.support.mirror_clients import (CONTAINERD_MANIFEST_ACCEPT, Podman, Skopeo, containerd_style_get,
                                          hosts_dir, registries_conf)
from tests.support.mirror_daemons import containerd_daemon_async, docker_daemon_async, listed_digest
from tests.support.paths import IMAGES, require_shared
from tests.support.request_log import SeenRequest, record_requests, requests_in_access_log
from tests.support.sandbox import WRITABLE_SYSTEM_DIRS, sandboxed
from tests.support.servers import free_port, start_kura, stop

pytestmark = pytest.mark.e2e

REFERENCE = "docker.io/library/redis:7"


@dataclass
class Mirror:
    host: str  # host:port
    seen: list[SeenRequest]
    dead: str  # host:port where nothing listens: docker.io's location

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@pytest.fixture
async def mirror(aiohttp_client, config):
    """An in-process Kura that records requests, holding redis:7 as library/redis and
    docker.io/library/redis."""
    require_shared()
    app = make_app(config)
    seen = record_requests(app)
    client = await serve_app(aiohttp_client, config, app)
    host = f"127.0.0.1:{client.server.port}"
    source = f"oci:{IMAGES / 'redis'}:7"
    for name, extra in (("library/redis", ()), ("docker.io/library/redis", ("--mount-from", "library/redis"))):
        pushed = await run_kura("push", "-q", *extra, source, f"{host}/{name}:7")
        assert pushed.returncode == 0, pushed.stderr
    seen.clear()
    return Mirror(host, seen, f"127.0.0.1:{free_port()}")


def pushed_digest() -> str:
    return tag_digest(IMAGES / "redis", "7")


def image_blobs() -> set[str]:
    """The config and layers of redis:7."""
    digest = pushed_digest()
    return {f"sha256:{h}" for h in reachable_blobs(IMAGES / "redis", digest)} - {digest}


def assert_pulled(seen: list[SeenRequest], repository: str, query: str, manifest_requests: list[str]) -> None:
    """Every request succeeded, named `repository` (but the /v2/ check) with the query `query`;
    the manifest requests were exactly `manifest_requests` and each blob was fetched."""
    lines = [f"{r.method} {r.path_qs} -> {r.status}" for r in seen]
    assert seen and all(r.status == 200 for r in seen), lines
    assert all(r.path == "/v2/" or r.path.startswith(f"/v2/{repository}/") for r in seen), lines
    assert all(r.query == query for r in seen if r.path != "/v2/"), lines
    manifests = [f"{r.method} {r.path_qs}" for r in seen if "/manifests/" in r.path]
    assert manifests == manifest_requests, lines
    blobs = [r for r in seen if "/blobs/" in r.path]
    assert all(r.method == "GET" for r in blobs), lines
    assert {r.path.rsplit("/", 1)[1] for r in blobs} == image_blobs(), lines


@pytest.mark.parametrize("namespace, repository", [("", "library/redis"),
                                                   ("/docker.io", "docker.io/library/redis")],
                         ids=["mirror-root", "mirror-namespace"])
async def test_podman_pulls_through_its_registry_mirror(mirror, tmp_path, namespace, repository):
    conf = registries_conf(tmp_path, "docker.io", mirror.dead, [mirror.host + namespace])
    podman = Podman(tmp_path / "podman", conf)
    pulled = await podman.pull(REFERENCE).run_async()
    assert pulled.returncode == 0, pulled.stderr
    assert_pulled(mirror.seen, repository, "", [f"GET /v2/{repository}/manifests/7"])
    assert [r.path for r in mirror.seen][0] == "/v2/"
    stored = await podman.image_digest(REFERENCE).run_async()
    assert stored.returncode == 0 and stored.stdout.strip() == pushed_digest(), stored


async def test_skopeo_copies_and_inspects_through_a_namespaced_mirror(mirror, tmp_path):
    skopeo = Skopeo(tmp_path / "skopeo", registries_conf(tmp_path, "docker.io", mirror.dead,
                                                         [f"{mirror.host}/docker.io"]))
    copied = await skopeo.copy(REFERENCE, tmp_path / "out", "7").run_async()
    assert copied.returncode == 0, copied.stderr
    assert tag_digest(tmp_path / "out", "7") == pushed_digest()
    assert_pulled(mirror.seen, "docker.io/library/redis", "", ["GET /v2/docker.io/library/redis/manifests/7"])
    mirror.seen.clear()
    inspected = await skopeo.inspect(REFERENCE).run_async()
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == pushed_digest()
    assert {r.path for r in mirror.seen} >= {"/v2/docker.io/library/redis/manifests/7"}


def test_skopeo_falls_back_to_the_location_when_the_mirror_does_not_answer(tmp_path):
    """What makes the other tests' dead location meaningful: the location is where the image
    "really" is, asked (without the mirror's namespace) when no mirror answers. With the
    helpers' blocking forms, against a `kura serve` child read through its access log."""
    require_shared()
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, log=log)
    try:
        pushed = asyncio.run(run_kura("push", "-q", f"oci:{IMAGES / 'redis'}:7", f"{server.host}/library/redis:7"))
        assert pushed.returncode == 0, pushed.stderr
        pushes = log.stat().st_size
        dead = f"127.0.0.1:{free_port()}"
        skopeo = Skopeo(tmp_path / "skopeo", registries_conf(tmp_path, "docker.io", server.host, [f"{dead}/docker.io"]))
        copied = skopeo.copy(REFERENCE, tmp_path / "out", "7").run()
    finally:
        stop(server)
    assert copied.returncode == 0, copied.stderr
    with open(log) as f:
        f.seek(pushes)
        seen = requests_in_access_log(f.read())
    assert_pulled(seen, "library/redis", "", ["GET /v2/library/redis/manifests/7"])


async def test_docker_pulls_through_its_registry_mirror(mirror, tmp_path):
    async with docker_daemon_async(tmp_path / "docker", [mirror.url]) as docker:
        pulled = await docker.pull("redis:7").run_async()
        assert pulled.returncode == 0, pulled.stderr + docker.log_tail()
        stored = await docker.image_digest("redis:7").run_async()
    assert stored.returncode == 0 and stored.stdout.strip() == pushed_digest(), stored
    digest = pushed_digest()
    assert_pulled(mirror.seen, "library/redis", "",
                  ["HEAD /v2/library/redis/manifests/7", f"GET /v2/library/redis/manifests/{digest}"])


@pytest.mark.parametrize("path, repository", [("", "library/redis"), ("/v2/docker.io", "docker.io/library/redis")],
                         ids=["mirror-root", "mirror-namespace"])
async def test_ctr_pulls_through_a_hosts_toml_mirror(mirror, tmp_path, path, repository):
    hosts = hosts_dir(tmp_path / "hosts", "docker.io", f"http://{mirror.dead}", [mirror.url + path])
    async with containerd_daemon_async(tmp_path / "containerd") as containerd:
        pulled = await containerd.pull(REFERENCE, hosts).run_async()
        assert pulled.returncode == 0, pulled.stderr + containerd.log_tail()
        listed = await containerd.images().run_async()
    assert listed_digest(listed.stdout, REFERENCE) == pushed_digest()
    digest = pushed_digest()
    assert_pulled(mirror.seen, repository, "ns=docker.io",
                  [f"HEAD /v2/{repository}/manifests/7?ns=docker.io",
                   f"GET /v2/{repository}/manifests/{digest}?ns=docker.io"])
    assert "/v2/" not in [r.path for r in mirror.seen]
    # What containerd_style_get imitates.
    assert mirror.seen[0].headers.getall("Accept") == [CONTAINERD_MANIFEST_ACCEPT]


async def test_containerd_style_get_asks_as_containerd_does(mirror):
    answer = await containerd_style_get(mirror.url, "library/redis", "7")
    assert answer.status == 200
    assert answer.headers["Docker-Content-Digest"] == pushed_digest()
    assert f"sha256:{hashlib.sha256(answer.body).hexdigest()}" == pushed_digest()
    [request] = mirror.seen
    assert (request.method, request.path_qs) == ("GET", "/v2/library/redis/manifests/7?ns=docker.io")
    assert request.headers.getall("Accept") == [CONTAINERD_MANIFEST_ACCEPT]
    head = await containerd_style_get(mirror.url, "library/redis", "7", method="HEAD")
    assert head.status == 200 and head.body == b""


def test_sandboxed_commands_write_only_to_their_scratch_folder(tmp_path):
    marker = f"kura-sandbox-{uuid.uuid4().hex}"
    writes = " && ".join(f"touch {d}/{marker}" for d in WRITABLE_SYSTEM_DIRS)
    ran = subprocess.run(sandboxed(["sh", "-c", f"{writes} && cat /etc/resolv.conf"], tmp_path),
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["nameserver", "127.0.0.1"]  # no name leaves the machine
    for directory in WRITABLE_SYSTEM_DIRS:
        assert not (Path(directory) / marker).exists()
    assert len(list(tmp_path.glob(f"overlay-*/*/upper/{marker}"))) == len(WRITABLE_SYSTEM_DIRS)
