"""Real clients pull through the cache in front of the emulated Docker Hub, each the way its
users configure a mirror: podman and skopeo (registries.conf, namespaced `host/docker.io`),
containerd's ctr (hosts.toml, `?ns=docker.io`) and dockerd (`registry-mirrors`, the root
mirror). Docker Hub's "real" location is a dead port: a pull that succeeds went through Kura.
The hub counts what reaches it: once a client has pulled, the others cost it nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from registry.app import make_app
from registry.config import Config
from registry.proxy.config import parse as parse_proxies
from registry.proxy.front import PROXY
from tests.support.fake_hub import emulated_hub
from tests.support.mirror_clients import Podman, Skopeo, hosts_dir, registries_conf
from tests.support.mirror_daemons import containerd_daemon_async, docker_daemon_async, listed_digest
from tests.support.layouts import tag_digest
from tests.support.servers import free_port

from .conftest import serve_app

pytestmark = pytest.mark.e2e

REFERENCE = "docker.io/library/redis:7"


@pytest.fixture
async def hub(tmp_path):
    async with emulated_hub(tmp_path / "hub") as running:
        yield running


@pytest.fixture
async def cache(hub, aiohttp_client, tmp_path):
    """Kura caching the hub as docker.io/… and as the root mirror of library/*."""
    proxies = parse_proxies([
        {"prefix": "docker.io", "remote": hub.registry_url},
        {"prefix": "", "remote": hub.registry_url, "docker_hub": True, "repositories": ["library/*"]},
    ])
    config = replace(Config(), root=tmp_path / "cache", access_log=False, proxies=proxies)
    client = await serve_app(aiohttp_client, config, make_app(config))
    client.host_port = f"127.0.0.1:{client.server.port}"
    return client


def hub_requests(hub) -> list[str]:
    return [f"{seen.method} {seen.path}" for seen in hub.requests]


async def test_podman_then_skopeo_then_ctr_share_one_cached_copy(hub, cache, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    namespaced = registries_conf(tmp_path, "docker.io", dead, [f"{cache.host_port}/docker.io"])
    podman = Podman(tmp_path / "podman", namespaced)
    pulled = await podman.pull(REFERENCE).run_async()
    assert pulled.returncode == 0, pulled.stderr
    stored = await podman.image_digest(REFERENCE).run_async()
    assert stored.stdout.strip() == hub.seeded.redis_index
    assert any("/blobs/" in line for line in hub_requests(hub))
    await cache.app[PROXY].manifests.drain()
    seen = len(hub.requests)

    copied = await Skopeo(tmp_path / "skopeo", namespaced).copy(REFERENCE, tmp_path / "layout", "7").run_async()
    assert copied.returncode == 0, copied.stderr
    assert tag_digest(tmp_path / "layout", "7") in (hub.seeded.redis_index, hub.seeded.redis_amd64)

    hosts = hosts_dir(tmp_path / "hosts", "docker.io", f"http://{dead}", [f"http://{cache.host_port}"])
    async with containerd_daemon_async(tmp_path / "containerd") as containerd:
        pulled = await containerd.pull(REFERENCE, hosts).run_async()
        assert pulled.returncode == 0, pulled.stderr + containerd.log_tail()
        listed = await containerd.images().run_async()
    assert listed_digest(listed.stdout, REFERENCE) == hub.seeded.redis_index
    # skopeo (namespaced) and ctr (?ns=docker.io) were served from podman's fill.
    assert hub_requests(hub)[seen:] == []


async def test_docker_pulls_through_the_root_mirror(hub, cache, tmp_path):
    async with docker_daemon_async(tmp_path / "docker", [f"http://{cache.host_port}"]) as docker:
        pulled = await docker.pull("redis:7").run_async()
        assert pulled.returncode == 0, pulled.stderr + docker.log_tail()
        stored = await docker.image_digest("redis:7").run_async()
    assert stored.stdout.strip() == hub.seeded.redis_index
    assert "GET /v2/library/redis/manifests/7" in hub_requests(hub)
    assert (await cache.get("/v2/_catalog")).status == 200
    assert "library/redis" in (await (await cache.get("/v2/_catalog")).json())["repositories"]
