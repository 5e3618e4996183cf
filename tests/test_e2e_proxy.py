"""The pull-through cache in front of an emulated Docker Hub (tests/support/fake_hub.py: Bearer
tokens from a token service on another port, `library/`, a multi-arch index with attestations,
rate-limit headers), pulled through by real clients; the hub counts what reaches it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from ocispec import mediatypes as mt
from ocispec.digest import Digest
from registry.config import Config
from registry.proxy.config import parse as parse_proxies
from registry.proxy.front import PROXY
from tests.support.cli import kura
from tests.support.fake_hub import PASSWORD, USERNAME, emulated_hub
from tests.support.mirror_clients import registries_conf
from tests.support.servers import free_port

from .conftest import serve_app

pytestmark = pytest.mark.e2e


@pytest.fixture
async def hub(tmp_path):
    async with emulated_hub(tmp_path / "hub") as running:
        yield running


async def start_cache(aiohttp_client, tmp_path, hub, **proxy):
    entry = {"prefix": "docker.io", "remote": hub.registry_url, "tag_ttl_seconds": 300, **proxy}
    config = replace(Config(), root=tmp_path / "cache", access_log=False, proxies=parse_proxies([entry]))
    client = await serve_app(aiohttp_client, config)
    client.host_port = f"127.0.0.1:{client.server.port}"
    return client


def hub_blob_gets(hub) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seen in hub.requests:
        if seen.method == "GET" and "/blobs/" in seen.path and seen.status != 401:  # not the token challenge
            digest = seen.path.rsplit("/", 1)[-1]
            counts[digest] = counts.get(digest, 0) + 1
    return counts


async def pull(home, reference: str, *args: str) -> str:
    ran = await kura(home, "pull", reference, "--platform", "linux/amd64", *args, timeout=180)
    assert ran.returncode == 0, ran.stderr
    images = json.loads((await kura(home, "images", "--json")).stdout)
    return images[0]["digest"]


async def test_kura_pull_through_the_cache_fetches_each_blob_once_then_nothing(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    digest = await pull(tmp_path / "first", f"{cache.host_port}/docker.io/library/redis:7")
    assert digest == hub.seeded.redis_amd64
    await cache.app[PROXY].manifests.drain()
    gets = hub_blob_gets(hub)
    assert gets and all(count == 1 for count in gets.values()), gets
    assert hub.token_requests, "the cache took a token from the hub's token service"
    seen = len(hub.requests)

    # Another client, within the TTL: not one request reaches the hub.
    assert await pull(tmp_path / "second", f"{cache.host_port}/docker.io/redis:7") == digest
    assert len(hub.requests) == seen, hub.requests[seen:]


async def test_twenty_concurrent_pulls_cause_one_upstream_fetch_per_blob(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    hub.slow_blobs(bytes_per_second=20e6)  # the pulls overlap for real
    accept = {"Accept": mt.ACCEPT_MANIFESTS}

    async def one_pull(session: aiohttp.ClientSession) -> int:
        base = f"http://{cache.host_port}/v2/docker.io/library/redis"
        async with session.get(f"{base}/manifests/7", headers=accept) as r:
            index = json.loads(await r.read())
        amd64 = next(m for m in index["manifests"] if m["platform"]["architecture"] == "amd64")
        async with session.get(f"{base}/manifests/{amd64['digest']}", headers=accept) as r:
            manifest = json.loads(await r.read())
        received = 0
        for descriptor in [manifest["config"], *manifest["layers"]]:
            async with session.get(f"{base}/blobs/{descriptor['digest']}") as r:
                assert r.status == 200
                hasher = hashlib.sha256()
                async for chunk in r.content.iter_chunked(1 << 20):
                    hasher.update(chunk)
                    received += len(chunk)
                assert "sha256:" + hasher.hexdigest() == descriptor["digest"]
        return received

    async with aiohttp.ClientSession() as session:
        sizes = await asyncio.gather(*(one_pull(session) for _ in range(20)))
    assert len(set(sizes)) == 1 and sizes[0] > 50_000_000
    gets = hub_blob_gets(hub)
    assert len(gets) == 5 and set(gets.values()) == {1}, gets
    assert hub.count("GET", "/manifests/7", 200) == 1


async def test_after_the_ttl_one_head_and_no_get(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub, tag_ttl_seconds=1)
    await pull(tmp_path / "first", f"{cache.host_port}/docker.io/library/debian:bookworm")
    manifest_gets = hub.count("GET", "/manifests/")
    remaining = hub.rate_limit.remaining
    await asyncio.sleep(1.2)
    before = len(hub.requests)
    await pull(tmp_path / "second", f"{cache.host_port}/docker.io/library/debian:bookworm")
    after = [(seen.method, seen.path) for seen in hub.requests[before:]]
    assert after == [("HEAD", "/v2/library/debian/manifests/bookworm")], after
    assert hub.count("GET", "/manifests/") == manifest_gets
    assert hub.rate_limit.remaining == remaining  # a HEAD costs no pull


async def test_a_moved_tag_is_fetched_after_the_ttl(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub, tag_ttl_seconds=0)
    first = await pull(tmp_path / "first", f"{cache.host_port}/docker.io/library/redis:7")
    moved = await hub.push_image("library/redis", "7")
    second = await pull(tmp_path / "second", f"{cache.host_port}/docker.io/library/redis:7")
    assert first == hub.seeded.redis_amd64 and second == moved


async def test_cached_images_are_pulled_while_the_hub_is_down(hub, aiohttp_client, tmp_path, caplog):
    cache = await start_cache(aiohttp_client, tmp_path, hub, tag_ttl_seconds=0)
    digest = await pull(tmp_path / "first", f"{cache.host_port}/docker.io/library/redis:7")
    await hub.stop()
    with caplog.at_level(logging.WARNING, logger="kura.proxy"):
        assert await pull(tmp_path / "second", f"{cache.host_port}/docker.io/library/redis:7") == digest
    assert any("stale" in record.getMessage() for record in caplog.records)
    ran = await kura(tmp_path / "third", "pull", f"{cache.host_port}/docker.io/library/debian:bookworm")
    assert ran.returncode != 0
    assert "cannot be reached" in ran.stderr and "not cached" in ran.stderr, ran.stderr


async def test_rate_limited_hub_serves_the_cache_and_reports_the_limit(hub, aiohttp_client, tmp_path, caplog):
    cache = await start_cache(aiohttp_client, tmp_path, hub, tag_ttl_seconds=0)
    await pull(tmp_path / "first", f"{cache.host_port}/docker.io/library/debian:bookworm")
    (status,) = (await (await cache.get("/proxy/status")).json())["proxies"]
    assert status["rate_limit"]["limit"].startswith("100") and status["rate_limit"]["remaining"] is not None
    hub.set_rate_limit(100, remaining=0, retry_after=0)
    moved = await hub.push_image("library/debian", "bookworm")  # the HEAD sees a change, the GET is refused
    with caplog.at_level(logging.WARNING, logger="kura.proxy"):
        stale = await pull(tmp_path / "second", f"{cache.host_port}/docker.io/library/debian:bookworm")
    assert stale == hub.seeded.debian != moved
    assert any("429" in record.getMessage() for record in caplog.records)
    (status,) = (await (await cache.get("/proxy/status")).json())["proxies"]
    assert status["rate_limit"]["last_429_at"] is not None
    r = await cache.get("/v2/docker.io/library/busybox/manifests/latest")  # not cached: the 429 passes on
    assert r.status == 429 and (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_private_upstream_repository_needs_the_proxy_credentials(hub, aiohttp_client, tmp_path):
    anonymous = await start_cache(aiohttp_client, tmp_path / "anonymous", hub)
    r = await anonymous.get("/v2/docker.io/acme/private/manifests/1")
    assert r.status == 404
    assert "refused access" in (await r.json())["errors"][0]["message"]
    signed_in = await start_cache(aiohttp_client, tmp_path / "alice", hub, username=USERNAME, password=PASSWORD)
    digest = await pull(tmp_path / "client", f"{signed_in.host_port}/docker.io/acme/private:1")
    assert digest == hub.seeded.private
    # The hub's credentials stay between the cache and the hub.
    assert all(PASSWORD not in value for value in r.headers.values())


async def test_a_corrupt_hub_blob_fails_the_pull_and_is_not_cached(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    manifest = json.loads(await (await cache.get(f"/v2/docker.io/library/debian/manifests/{hub.seeded.debian}")).read())
    layer = manifest["layers"][0]["digest"]
    hub.corrupt_blob(layer)
    ran = await kura(tmp_path / "first", "pull", f"{cache.host_port}/docker.io/library/debian:bookworm")
    assert ran.returncode != 0
    hex_ = layer.split(":")[1]
    assert not (tmp_path / "cache" / "blobs" / "sha256" / hex_[:2] / hex_).exists()
    hub.corrupt_blob(layer, False)
    assert await pull(tmp_path / "second", f"{cache.host_port}/docker.io/library/debian:bookworm") == hub.seeded.debian


async def test_the_first_bytes_arrive_while_the_hub_holds_back_the_rest(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    manifest = json.loads(await (await cache.get(f"/v2/docker.io/library/debian/manifests/{hub.seeded.debian}")).read())
    layer = manifest["layers"][0]
    hub.hold_blobs(after_bytes=1 << 20)
    r = await cache.get(f"/v2/docker.io/library/debian/blobs/{layer['digest']}")
    assert r.status == 200 and r.content_length == layer["size"]
    first = await asyncio.wait_for(r.content.readexactly(512 * 1024), 10)  # while the hub holds the rest
    assert len(first) == 512 * 1024
    hub.release_blobs()
    rest = await r.read()
    assert "sha256:" + hashlib.sha256(first + rest).hexdigest() == layer["digest"]


async def test_containerd_style_requests_with_ns(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    r = await cache.get("/v2/library/redis/manifests/7?ns=docker.io", headers={"Accept": mt.ACCEPT_MANIFESTS})
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == hub.seeded.redis_index
    index = json.loads(await r.read())
    config = json.loads(await (await cache.get(
        f"/v2/library/redis/manifests/{hub.seeded.redis_amd64}?ns=docker.io")).read())["config"]
    r = await cache.get(f"/v2/library/redis/blobs/{config['digest']}?ns=docker.io")
    assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == config["digest"].split(":")[1]
    await cache.app[PROXY].manifests.drain()
    driver = cache.app[PROXY].driver
    for entry in index["manifests"]:
        stored = await driver.get_manifest_link("docker.io/library/redis", _digest(entry)) is not None
        # Every platform's manifest is stored with the index; attestations (each GET a Docker
        # Hub pull) only when asked for.
        assert stored == (entry["platform"]["os"] != "unknown"), entry
        if not stored:
            r = await cache.get(f"/v2/library/redis/manifests/{entry['digest']}?ns=docker.io")
            assert r.status == 200
            assert await driver.get_manifest_link("docker.io/library/redis", _digest(entry)) is not None


def _digest(entry: dict) -> Digest:
    return Digest.parse(entry["digest"])


async def test_upstream_credentials_come_from_the_docker_config_of_the_serving_user(hub, aiohttp_client, tmp_path):
    config_dir = Path(os.environ["DOCKER_CONFIG"])
    config_dir.mkdir(parents=True, exist_ok=True)
    login = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {hub.registry_host: {"auth": login}}}))
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    digest = await pull(tmp_path / "client", f"{cache.host_port}/docker.io/acme/private:1")
    assert digest == hub.seeded.private
    assert all(seen.had_authorization for seen in hub.requests if "/acme/private/" in seen.path and seen.status == 200)


async def test_kura_pull_uses_the_cache_as_its_registries_conf_mirror(hub, aiohttp_client, tmp_path):
    cache = await start_cache(aiohttp_client, tmp_path, hub)
    dead = f"127.0.0.1:{free_port()}"  # docker.io's "real" location: nothing answers there
    conf = registries_conf(tmp_path / "conf", "docker.io", dead, [f"{cache.host_port}/docker.io"])
    digest = await pull(tmp_path / "client", "docker.io/library/redis:7", "--registries-conf", str(conf))
    assert digest == hub.seeded.redis_amd64
    assert hub.count("GET", "/manifests/7", 200) == 1
