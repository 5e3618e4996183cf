"""The pull-through cache against an upstream Kura on loopback: routing of names, read-only
proxied names, tag TTL and HEAD revalidation, indexes stored whole, stale serving, streaming
and single-flight blob fetches, verification. (Docker Hub's emulation, with token auth and
real clients, is in test_e2e_proxy.py.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ocispec.mediatypes import OCI_INDEX, OCI_MANIFEST
from registry.app import make_app
from registry.auth import htpasswd
from registry.auth.config import parse as parse_auth
from registry.config import Config
from ocispec.digest import Digest
from registry.context import CONFIG, STORAGE
from registry.quota import collect_garbage
from storage import FilesystemDriver
from storage.fsck import fsck
from registry.proxy import manifests as proxy_manifests
from registry.proxy import service as proxy_service
from registry.proxy.config import parse as parse_proxies
from registry.proxy.front import PROXY

from .conftest import error_code, push_image, serve_app


class Upstream:
    """A Kura registry that records every request it answers and can be made to fail."""

    def __init__(self, config: Config):
        self.requests: list[tuple[str, str]] = []
        self.fail_status: int | None = None
        self.corrupt: set[str] = set()
        self.blob_delay = 0.0
        self.app = make_app(config)
        self.app.middlewares.insert(0, self._middleware)
        self.server: TestServer | None = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.requests.append((request.method, request.path_qs))
        if self.fail_status is not None:
            return web.Response(status=self.fail_status)
        digest = request.path.rsplit("/", 1)[-1]
        if "/blobs/" in request.path and request.method == "GET" and (digest in self.corrupt or self.blob_delay):
            return await self._blob_by_hand(request, handler, digest)
        return await handler(request)

    async def _blob_by_hand(self, request, handler, digest):
        try:
            data = bytearray(open(self.blob_path(digest), "rb").read())
        except FileNotFoundError:
            return await handler(request)
        if digest in self.corrupt:
            data[len(data) // 2] ^= 0xFF
        response = web.StreamResponse(status=200, headers={"Docker-Content-Digest": digest})
        response.content_length = len(data)
        await response.prepare(request)
        step = max(len(data) // 8, 1)
        for start in range(0, len(data), step):
            await response.write(bytes(data[start:start + step]))
            await asyncio.sleep(self.blob_delay)
        await response.write_eof()
        return response

    def blob_path(self, digest: str) -> str:
        algorithm, hex_ = digest.split(":")
        return str(self.root / "blobs" / algorithm / hex_[:2] / hex_)

    def count(self, method: str | None = None, contains: str = "") -> int:
        return sum(1 for m, path in self.requests if (method is None or m == method) and contains in path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def upstream(tmp_path, aiohttp_client):
    config = replace(Config(), root=tmp_path / "upstream", access_log=False)
    hub = Upstream(config)
    hub.root = config.root
    client = await aiohttp_client(TestServer(hub.app))
    hub.server = client.server
    hub.client = client
    return hub


async def cache_for(aiohttp_client, tmp_path, upstream_url: str, grace_seconds: int = 0, **proxy):
    entry = {"prefix": "docker.io", "remote": upstream_url, "tag_ttl_seconds": 300, **proxy}
    config = replace(Config(), root=tmp_path / "cache", access_log=False, gc_grace_seconds=grace_seconds,
                     proxies=parse_proxies([entry]))
    return await serve_app(aiohttp_client, config)


async def push_to(upstream, repo: str, tag: str, layer: bytes = b"layer") -> str:
    digest, _ = await push_image(upstream.client, repo, tag, layer=layer)
    return digest


async def test_a_pull_by_tag_is_fetched_once_then_served_from_the_cache(upstream, aiohttp_client, tmp_path):
    digest = await push_to(upstream, "library/redis", "7", layer=b"redis layer " * 1000)
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    before = len(upstream.requests)
    first = await cache.get("/v2/docker.io/library/redis/manifests/7")
    assert first.status == 200, await first.text()
    assert first.headers["Docker-Content-Digest"] == digest
    manifest = json.loads(await first.read())
    assert upstream.count("GET", "/manifests/7") == 1
    for descriptor in [manifest["config"], *manifest["layers"]]:
        r = await cache.get(f"/v2/docker.io/library/redis/blobs/{descriptor['digest']}")
        assert r.status == 200
        assert hashlib.sha256(await r.read()).hexdigest() == descriptor["digest"].split(":")[1]
    fetched = len(upstream.requests) - before

    # Within the TTL: tag, digest and blobs come from the store, no upstream request at all.
    again = await cache.get("/v2/docker.io/library/redis/manifests/7")
    assert again.status == 200 and again.headers["Docker-Content-Digest"] == digest
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert (await cache.get(f"/v2/docker.io/library/redis/blobs/{descriptor['digest']}")).status == 200
    assert len(upstream.requests) - before == fetched


@pytest.mark.parametrize("path", ["/v2/docker.io/redis/manifests/7", "/v2/library/redis/manifests/7?ns=docker.io"])
async def test_single_names_and_containerd_ns_reach_the_same_cached_repository(upstream, aiohttp_client,
                                                                                tmp_path, path):
    digest = await push_to(upstream, "library/redis", "7")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    r = await cache.get(path)
    assert r.status == 200, await r.text()
    assert r.headers["Docker-Content-Digest"] == digest
    listed = await (await cache.get("/v2/_catalog")).json()
    assert listed["repositories"] == ["docker.io/library/redis"]


async def test_root_mirror_serves_library_names_next_to_private_repositories(upstream, aiohttp_client, tmp_path):
    digest = await push_to(upstream, "library/redis", "7")
    config = replace(Config(), root=tmp_path / "cache", access_log=False, proxies=parse_proxies(
        [{"prefix": "", "remote": upstream.url, "docker_hub": True, "repositories": ["library/*"]}]))
    cache = await serve_app(aiohttp_client, config)
    r = await cache.get("/v2/library/redis/manifests/7")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    # A name the mirror does not serve is an ordinary private repository: pushes work.
    pushed, _ = await push_image(cache, "team/app", "1")
    assert (await cache.get("/v2/team/app/manifests/1")).headers["Docker-Content-Digest"] == pushed
    assert upstream.count(contains="team/app") == 0


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/docker.io/library/redis/blobs/uploads/"),
    ("PUT", "/v2/docker.io/library/redis/manifests/7"),
    ("DELETE", "/v2/docker.io/library/redis/manifests/7"),
])
async def test_names_a_proxy_serves_are_read_only(upstream, aiohttp_client, tmp_path, method, path):
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    r = await cache.request(method, path, data=b"{}")
    assert r.status == 403
    body = await r.json()
    assert body["errors"][0]["code"] == "DENIED"
    assert "docker.io" in body["errors"][0]["message"] and upstream.url in body["errors"][0]["message"]


async def test_after_the_ttl_one_head_revalidates_and_only_a_change_costs_a_get(upstream, aiohttp_client,
                                                                               tmp_path, monkeypatch):
    old = await push_to(upstream, "library/redis", "7", layer=b"old")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url, tag_ttl_seconds=0)
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).headers["Docker-Content-Digest"] == old
    gets, heads = upstream.count("GET", "/manifests/"), upstream.count("HEAD", "/manifests/")

    r = await cache.get("/v2/docker.io/library/redis/manifests/7")
    assert r.headers["Docker-Content-Digest"] == old
    assert upstream.count("HEAD", "/manifests/") == heads + 1
    assert upstream.count("GET", "/manifests/") == gets  # unchanged: no GET

    new = await push_to(upstream, "library/redis", "7", layer=b"new")
    r = await cache.get("/v2/docker.io/library/redis/manifests/7")
    assert r.headers["Docker-Content-Digest"] == new
    assert upstream.count("HEAD", "/manifests/") == heads + 2
    assert upstream.count("GET", "/manifests/") == gets + 1


async def test_an_index_is_stored_with_every_platform_manifest(upstream, aiohttp_client, tmp_path):
    amd64 = await push_to(upstream, "library/busybox", "amd64", layer=b"amd64")
    arm64 = await push_to(upstream, "library/busybox", "arm64", layer=b"arm64")
    manifests = []
    for digest, arch in ((amd64, "amd64"), (arm64, "arm64")):
        size = len(await (await upstream.client.get(f"/v2/library/busybox/manifests/{digest}")).read())
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                          "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    r = await upstream.client.put("/v2/library/busybox/manifests/latest", data=index,
                                  headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    r = await cache.get("/v2/docker.io/library/busybox/manifests/latest")
    assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX
    await cache.app[PROXY].manifests.drain()
    before = len(upstream.requests)
    for digest in (amd64, arm64):  # both platforms, though only the index was asked for
        r = await cache.get(f"/v2/docker.io/library/busybox/manifests/{digest}")
        assert r.status == 200
    assert len(upstream.requests) == before


async def test_cached_content_is_served_while_the_upstream_is_down(upstream, aiohttp_client, tmp_path, caplog):
    digest = await push_to(upstream, "library/redis", "7")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url, tag_ttl_seconds=0)
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    upstream.fail_status = 503
    r = await cache.get("/v2/docker.io/library/redis/manifests/7")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    assert any("stale" in record.getMessage() for record in caplog.records)
    # What is not cached fails, in the spec's error format.
    r = await cache.get("/v2/docker.io/library/debian/manifests/bookworm")
    assert r.status == 503
    assert await error_code(r) == "UNAVAILABLE"


async def test_a_missing_upstream_tag_is_manifest_unknown(upstream, aiohttp_client, tmp_path):
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    r = await cache.get("/v2/docker.io/library/nothing/manifests/1")
    assert r.status == 404
    assert await error_code(r) == "MANIFEST_UNKNOWN"


async def test_concurrent_pulls_of_a_missing_blob_cause_one_upstream_fetch(upstream, aiohttp_client, tmp_path):
    layer = bytes(range(256)) * 8192  # 2 MiB
    await push_to(upstream, "library/redis", "7", layer=layer)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    upstream.blob_delay = 0.02
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)

    async def pull() -> bytes:
        r = await cache.get(f"/v2/docker.io/library/redis/blobs/{digest}")
        assert r.status == 200
        return await r.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(body == layer for body in bodies)
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_the_first_bytes_reach_the_client_before_the_upstream_has_sent_everything(upstream, aiohttp_client,
                                                                                      tmp_path):
    layer = bytes(range(256)) * 8192
    await push_to(upstream, "library/redis", "7", layer=layer)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    upstream.blob_delay = 0.3  # 8 pieces: the whole blob takes ~2.4 s
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await cache.get(f"/v2/docker.io/library/redis/blobs/{digest}")
    first = await r.content.readany()
    first_byte = loop.time() - started
    rest = await r.read()
    total = loop.time() - started
    assert first and first + rest == layer
    assert first_byte < total / 2, (first_byte, total)


async def test_a_corrupt_upstream_blob_fails_the_client_and_is_not_stored(upstream, aiohttp_client, tmp_path):
    layer = b"x" * (3 << 20)
    await push_to(upstream, "library/redis", "7", layer=layer)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    upstream.corrupt.add(digest)
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    with pytest.raises(aiohttp.ClientPayloadError):
        r = await cache.get(f"/v2/docker.io/library/redis/blobs/{digest}")
        await r.read()
    assert not (tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    # Once the upstream is mended, the next pull fetches it again and succeeds.
    upstream.corrupt.clear()
    r = await cache.get(f"/v2/docker.io/library/redis/blobs/{digest}")
    assert r.status == 200 and await r.read() == layer


async def test_a_blob_stored_for_another_repository_is_linked_after_an_upstream_head(upstream, aiohttp_client,
                                                                                    tmp_path):
    layer = b"shared base layer"
    await push_to(upstream, "library/debian", "12", layer=layer)
    await push_to(upstream, "library/redis", "7", layer=layer)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    assert await (await cache.get(f"/v2/docker.io/library/debian/blobs/{digest}")).read() == layer
    r = await cache.get(f"/v2/docker.io/library/redis/blobs/{digest}")
    assert r.status == 200 and await r.read() == layer
    assert upstream.count("GET", f"/library/redis/blobs/{digest}") == 0
    assert upstream.count("HEAD", f"/library/redis/blobs/{digest}") == 1


async def test_least_recently_pulled_images_go_first_above_max_bytes(upstream, aiohttp_client, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(proxy_manifests, "PULL_RECORD_SECONDS", 0)
    monkeypatch.setattr(proxy_service, "SIZE_CHECK_SECONDS", 0)
    layers = {name: name.encode() * (1 << 20) for name in "abcd"}  # 1 MiB each
    for name, layer in layers.items():
        await push_to(upstream, f"library/{name}", "1", layer=layer)
    # The default grace period (an hour): evicted blobs go at once all the same.
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url, max_bytes=int(2.5 * (1 << 20)),
                            grace_seconds=3600)
    # A private repository holding b's layer too: eviction must never take it from there.
    await push_image(cache, "team/app", "1", layer=layers["b"])

    async def pull(name: str) -> None:
        r = await cache.get(f"/v2/docker.io/library/{name}/manifests/1")
        assert r.status == 200
        manifest = json.loads(await r.read())
        for descriptor in [manifest["config"], *manifest["layers"]]:
            await (await cache.get(f"/v2/docker.io/library/{name}/blobs/{descriptor['digest']}")).read()

    def stored(name: str) -> bool:
        hex_ = hashlib.sha256(layers[name]).hexdigest()
        return (tmp_path / "cache" / "blobs" / "sha256" / hex_[:2] / hex_).exists()

    async def evicted(name: str) -> bool:
        digest = Digest.parse(await _digest_of(upstream, name))
        return await cache.app[STORAGE].get_manifest_link(f"docker.io/library/{name}", digest) is None

    async def until_evicted(name: str) -> None:
        for _ in range(200):
            if await evicted(name):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} was not evicted")

    await pull("a")
    await pull("b")
    await pull("a")  # a is now more recent than b
    await pull("c")  # over the cap: b, the least recently pulled, goes
    await until_evicted("b")
    assert not await evicted("a") and not await evicted("c")
    assert stored("b"), "the private repository's blob was deleted"
    await pull("d")  # over the cap again: a goes, and its layer with it
    await until_evicted("a")
    for _ in range(200):
        if not stored("a"):
            break
        await asyncio.sleep(0.05)
    assert not stored("a") and stored("c") and stored("d")
    assert not await evicted("c") and not await evicted("d")
    # An evicted image is simply fetched again.
    await pull("b")
    assert not await evicted("b")


async def _digest_of(upstream, name: str) -> str:
    r = await upstream.client.head(f"/v2/library/{name}/manifests/1")
    return r.headers["Docker-Content-Digest"]


async def test_a_cached_repository_missing_unpulled_blobs_is_consistent_for_fsck(upstream, aiohttp_client,
                                                                                  tmp_path):
    await push_to(upstream, "library/redis", "7")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    report = await fsck(FilesystemDriver(tmp_path / "cache"))
    assert report.ok, report.problems
    assert report.manifests == 1 and report.tags == 1


async def test_proxy_status_reports_upstream_requests_and_failures(upstream, aiohttp_client, tmp_path):
    await push_to(upstream, "library/redis", "7")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    await cache.get("/v2/docker.io/library/redis/manifests/7")
    upstream.fail_status = 502
    await cache.get("/v2/docker.io/library/debian/manifests/12")
    (status,) = (await (await cache.get("/proxy/status")).json())["proxies"]
    assert status["prefix"] == "docker.io" and status["remote"] == upstream.url
    assert status["requests"] >= 2 and status["failures"] == 1
    assert "502" in status["last_failure"]


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_pulling_through_the_cache_follows_the_access_rules(upstream, aiohttp_client, tmp_path):
    digest = await push_to(upstream, "library/redis", "7")
    root = tmp_path / "cache"
    for user, password in (("alice", "alice-secret-1"), ("bob", "bob-secret-2")):
        htpasswd.set_user(root / "auth" / "htpasswd", user, password, cost=4)
    auth = parse_auth({"mode": "htpasswd", "rules": [
        {"repositories": ["docker.io/**"], "users": ["alice"], "actions": ["*"]},
        {"repositories": ["team/**"], "users": ["bob"], "actions": ["pull"]},
    ]})
    config = replace(Config(), root=root, access_log=False, auth=auth, proxies=parse_proxies(
        [{"prefix": "docker.io", "remote": upstream.url}]))
    cache = await serve_app(aiohttp_client, config)
    path = "/v2/docker.io/library/redis/manifests/7"
    before = len(upstream.requests)
    assert (await cache.get(path)).status == 401
    assert (await cache.get(path, headers=basic("bob", "bob-secret-2"))).status == 403
    assert len(upstream.requests) == before, "a refused client made the cache ask the upstream"
    r = await cache.get(path, headers=basic("alice", "alice-secret-1"))
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    # Even with every right on the name, a proxied name stays read-only.
    r = await cache.put(path, data=b"{}", headers=basic("alice", "alice-secret-1"))
    assert r.status == 403 and await error_code(r) == "DENIED"


async def test_ns_never_reaches_a_cached_repository_the_caller_may_not_pull(upstream, aiohttp_client, tmp_path):
    await push_to(upstream, "myorg/secret", "1")
    root = tmp_path / "cache"
    htpasswd.set_user(root / "auth" / "htpasswd", "alice", "alice-secret-1", cost=4)
    htpasswd.set_user(root / "auth" / "htpasswd", "bob", "bob-secret-2", cost=4)
    auth = parse_auth({"mode": "htpasswd", "rules": [
        {"repositories": ["docker.io/**"], "users": ["alice"], "actions": ["pull"]},
        {"repositories": ["myorg/**", "docker.io/redis"], "users": ["bob"], "actions": ["pull"]},
    ]})
    config = replace(Config(), root=root, access_log=False, auth=auth, proxies=parse_proxies(
        [{"prefix": "docker.io", "remote": upstream.url}]))
    cache = await serve_app(aiohttp_client, config)
    alice, bob = basic("alice", "alice-secret-1"), basic("bob", "bob-secret-2")
    assert (await cache.get("/v2/docker.io/myorg/secret/manifests/1", headers=alice)).status == 200  # now cached
    before = len(upstream.requests)
    # bob may pull myorg/secret (a private name here), not docker.io/myorg/secret.
    r = await cache.get("/v2/myorg/secret/manifests/1?ns=docker.io", headers=bob)
    assert r.status == 404 and await error_code(r) in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")
    # docker.io/redis is docker.io/library/redis, which bob may not pull.
    r = await cache.get("/v2/docker.io/redis/manifests/7", headers=bob)
    assert r.status == 403 and await error_code(r) == "DENIED"
    assert len(upstream.requests) == before
    r = await cache.get("/v2/myorg/secret/manifests/1?ns=docker.io", headers=alice)  # alice may: the cache
    assert r.status == 403  # auth checks the written name first, which alice may not pull


async def test_a_private_repository_under_a_proxied_name_is_never_filled_or_evicted(upstream, aiohttp_client,
                                                                                    tmp_path):
    await push_to(upstream, "team/app", "1", layer=b"upstream's")
    private_config = replace(Config(), root=tmp_path / "cache", access_log=False)
    private = await serve_app(aiohttp_client, private_config)
    pushed, _ = await push_image(private, "docker.io/team/app", "1", layer=b"ours" * 1000)
    await private.close()

    cache = await cache_for(aiohttp_client, tmp_path, upstream.url, tag_ttl_seconds=0, max_bytes=1)
    before = len(upstream.requests)
    r = await cache.get("/v2/docker.io/team/app/manifests/1")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == pushed
    assert len(upstream.requests) == before
    await push_to(upstream, "library/a", "1", layer=b"a" * 4096)
    await push_to(upstream, "library/b", "1", layer=b"b" * 4096)
    for name in ("a", "b"):
        assert (await cache.get(f"/v2/docker.io/library/{name}/manifests/1")).status == 200
    await collect_garbage(cache.app[STORAGE], cache.app[CONFIG])
    r = await cache.get("/v2/docker.io/team/app/manifests/1")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == pushed


async def test_an_unreachable_upstream_is_not_asked_again_for_a_while(upstream, aiohttp_client, tmp_path):
    await push_to(upstream, "library/redis", "7")
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url, tag_ttl_seconds=0)
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    upstream.fail_status = 503
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    asked = len(upstream.requests)
    for _ in range(3):
        assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    assert len(upstream.requests) == asked


async def test_an_empty_blob_is_served_through_the_cache(upstream, aiohttp_client, tmp_path):
    await push_to(upstream, "library/empty", "1", layer=b"")
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    cache = await cache_for(aiohttp_client, tmp_path, upstream.url)
    r = await cache.get(f"/v2/docker.io/library/empty/blobs/{digest}")
    assert r.status == 200 and await r.read() == b""
    assert await cache.app[STORAGE].is_blob_linked("docker.io/library/empty", Digest.parse(digest))
