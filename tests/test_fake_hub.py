"""The emulated Docker Hub (tests/support/fake_hub.py) behaves as Docker Hub does for the
clients that will talk to it through a cache: the Bearer flow against a token service on
another port, anonymous pulls of library/ and a private repository for alice, the index with
attestation manifests, the pull-rate counter, and the knobs tests turn (down and up again,
failures, poisoned and slow blob bodies, moved tags)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import aiohttp
import pytest

from tests.support.cli import kura, one_line_error
from tests.support.fake_hub import PASSWORD, emulated_hub
from tests.support.hub_content import IN_TOTO, PROVENANCE, SPDX

pytestmark = pytest.mark.e2e


@pytest.fixture
async def hub(tmp_path):
    async with emulated_hub(tmp_path) as running:
        yield running


@pytest.fixture
def home(tmp_path):
    return tmp_path / "client"


async def skopeo(*args: str) -> str:
    process = await asyncio.create_subprocess_exec("skopeo", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def token(session: aiohttp.ClientSession, hub, scope: str, user: str | None = None) -> dict[str, str]:
    """Authorization for `scope`, asked of the token service as Docker's clients ask it."""
    auth = aiohttp.BasicAuth(user, PASSWORD) if user else None
    async with session.get(hub.token_url, params={"service": "registry.docker.io", "scope": scope}, auth=auth) as r:
        assert r.status == 200, await r.text()
        return {"Authorization": f"Bearer {(await r.json())['token']}"}


async def manifest_of(session, hub, repository: str, reference: str) -> dict:
    headers = await token(session, hub, f"repository:{repository}:pull")
    async with session.get(f"{hub.registry_url}/v2/{repository}/manifests/{reference}", headers=headers) as r:
        assert r.status == 200, await r.text()
        return json.loads(await r.read())


async def stored_images(home) -> list[tuple[str, str]]:
    listed = await kura(home, "images", "--json")
    return [(image["reference"], image["digest"]) for image in json.loads(listed.stdout)]


def busybox_amd64_layer(hub) -> tuple[str, int, bytes]:
    """The one layer of the busybox amd64 image (acme/private:1 too): digest, size, bytes."""
    manifest = json.loads(blob_file(hub, hub.seeded.busybox_amd64).read_bytes())
    layer = manifest["layers"][0]
    return layer["digest"], layer["size"], blob_file(hub, layer["digest"]).read_bytes()


def blob_file(hub, digest: str):
    hex_digest = digest.split(":", 1)[1]
    return hub.root / "blobs" / "sha256" / hex_digest[:2] / hex_digest


async def test_anonymous_pull_goes_through_the_token_service_on_another_port(hub, home):
    pulled = await kura(home, "pull", f"{hub.registry_host}/library/redis:7", "-q")
    assert pulled.returncode == 0, pulled.stderr
    assert await stored_images(home) == [(f"{hub.registry_host}/library/redis:7", hub.seeded.redis_amd64)]
    first = hub.requests[0]
    assert (first.path, first.status, first.had_authorization) == ("/v2/", 401, False)
    assert hub.token_url.rsplit(":", 1)[1] != hub.registry_host.rsplit(":", 1)[1]
    assert any(s.path == "/auth/token" and s.status == 200 and "scope=repository:library/redis:pull" in s.query
               for s in hub.token_requests), hub.token_requests
    redis = [s for s in hub.requests if s.path.startswith("/v2/library/redis/")]
    assert redis and all(s.had_authorization and s.status == 200 for s in redis), redis
    assert hub.count("GET", "/manifests/", 200) == 2  # the index, then the amd64 image
    assert hub.count("GET", "/blobs/", 200) == 5  # config and four layers


async def test_private_repository_is_refused_anonymously_and_served_to_alice(hub, home):
    reference = f"{hub.registry_host}/acme/private:1"
    refused = await kura(home, "pull", reference)
    assert "refused access to acme/private" in one_line_error(refused)
    async with aiohttp.ClientSession() as session:
        anonymous = await token(session, hub, "repository:acme/private:pull")
        async with session.get(f"{hub.registry_url}/v2/acme/private/manifests/1", headers=anonymous) as r:
            assert r.status == 401
            assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
            assert 'scope="repository:acme/private:pull"' in r.headers["WWW-Authenticate"]
            assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"

    wrong = await kura(home, "login", "-u", "alice", "--password-stdin", hub.registry_host, stdin=b"wrong-password\n")
    assert "invalid username or password" in one_line_error(wrong)
    login = await kura(home, "login", "-u", "alice", "--password-stdin", hub.registry_host,
                       stdin=PASSWORD.encode() + b"\n")
    assert login.returncode == 0, login.stderr
    pulled = await kura(home, "pull", reference, "-q")
    assert pulled.returncode == 0, pulled.stderr
    assert await stored_images(home) == [(reference, hub.seeded.private)]
    assert hub.count("POST", "/auth/token", 200, among=hub.token_requests) >= 1  # alice's password grant


async def test_redis_index_carries_an_attestation_manifest_per_platform(hub):
    target = f"docker://{hub.registry_host}/library/redis"
    index = json.loads(await skopeo("inspect", "--raw", "--tls-verify=false", f"{target}:7"))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = [(m["platform"]["os"], m["platform"]["architecture"], m["platform"].get("variant"))
                 for m in index["manifests"]]
    assert platforms == [("linux", "amd64", None), ("linux", "arm64", "v8"),
                         ("unknown", "unknown", None), ("unknown", "unknown", None)]
    images = {m["digest"] for m in index["manifests"][:2]}
    assert images == {hub.seeded.redis_amd64, hub.seeded.redis_arm64}
    attestations = index["manifests"][2:]
    assert [a["annotations"]["vnd.docker.reference.type"] for a in attestations] == ["attestation-manifest"] * 2
    assert [a["annotations"]["vnd.docker.reference.digest"] for a in attestations] == [
        hub.seeded.redis_amd64, hub.seeded.redis_arm64]
    latest = json.loads(await skopeo("inspect", "--raw", "--tls-verify=false", f"{target}:latest"))
    assert latest == index

    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/redis:pull")
        for entry in attestations:
            manifest = json.loads(await skopeo("inspect", "--raw", "--tls-verify=false", f"{target}@{entry['digest']}"))
            assert [layer["mediaType"] for layer in manifest["layers"]] == [IN_TOTO, IN_TOTO]
            for layer in manifest["layers"]:
                async with session.get(f"{hub.registry_url}/v2/library/redis/blobs/{layer['digest']}",
                                       headers=headers) as r:
                    body = await r.read()
                assert r.status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
                statement = json.loads(body)
                assert statement["predicateType"] == layer["annotations"]["in-toto.io/predicate-type"]
                assert statement["subject"][0]["digest"]["sha256"] == entry["annotations"][
                    "vnd.docker.reference.digest"].split(":", 1)[1]
            assert {layer["annotations"]["in-toto.io/predicate-type"] for layer in manifest["layers"]} == {
                SPDX, PROVENANCE}
    # An arm64 client gets the busybox stand-in; the attestation entries are never chosen.
    arm64 = json.loads(await skopeo("inspect", "--tls-verify=false", "--override-arch", "arm64",
                                    "--override-variant", "v8", f"{target}:7"))
    arm64_image = json.loads(blob_file(hub, hub.seeded.redis_arm64).read_bytes())
    assert (arm64["Digest"], arm64["Architecture"]) == (hub.seeded.redis_index, "arm64")
    assert arm64["Layers"] == [layer["digest"] for layer in arm64_image["layers"]]


async def test_rate_limit_counts_manifest_gets_not_heads_and_answers_429_at_zero(hub):
    url = f"{hub.registry_url}/v2/library/debian/manifests/bookworm"
    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/debian:pull")
        for _ in range(2):
            async with session.head(url, headers=headers) as r:
                assert r.status == 200
                assert r.headers["ratelimit-limit"] == "100;w=21600"
                assert r.headers["ratelimit-remaining"] == "100;w=21600"
                assert r.headers["docker-ratelimit-source"] == "127.0.0.1"
        for left in (99, 98):
            async with session.get(url, headers=headers) as r:
                assert r.status == 200 and r.headers["ratelimit-remaining"] == f"{left};w=21600"
        async with session.head(url, headers=headers) as r:
            assert r.headers["ratelimit-remaining"] == "98;w=21600"
        layer = json.loads(blob_file(hub, hub.seeded.debian).read_bytes())["config"]["digest"]
        async with session.get(f"{hub.registry_url}/v2/library/debian/blobs/{layer}", headers=headers) as r:
            assert r.status == 200 and "ratelimit-remaining" not in r.headers  # blobs are not pulls

        hub.set_rate_limit(100, 1, retry_after=7)
        async with session.get(url, headers=headers) as r:
            assert r.status == 200 and r.headers["ratelimit-remaining"] == "0;w=21600"
        async with session.get(url, headers=headers) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "7"
            assert r.headers["ratelimit-remaining"] == "0;w=21600"
            body = await r.json()
            assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert "pull rate limit" in body["errors"][0]["message"]
        async with session.head(url, headers=headers) as r:
            assert r.status == 200 and r.headers["ratelimit-remaining"] == "0;w=21600"
        async with session.get(url) as r:  # no token: the challenge, not the counter
            assert r.status == 401 and "ratelimit-remaining" not in r.headers
    assert hub.count("GET", "/manifests/", 429) == 1
    assert hub.count("HEAD", "/manifests/", 200) == 4


async def test_stop_refuses_connections_and_start_comes_back_on_the_same_port(hub):
    port = hub.registry.port
    digest, size, _ = busybox_amd64_layer(hub)
    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/busybox:pull")
        hub.hold_blobs(after_bytes=16 * 1024)
        blob = f"{hub.registry_url}/v2/library/busybox/blobs/{digest}"
        async with session.get(blob, headers=headers) as r:
            assert len(await r.content.readexactly(16 * 1024)) == 16 * 1024
            await hub.stop()  # cuts off the download in flight
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        hub.release_blobs()
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(f"{hub.registry_url}/v2/")
        await token(session, hub, "repository:library/busybox:pull")  # the token service stays up

        await hub.start()
        assert hub.registry.port == port
        async with session.get(blob, headers=headers) as r:
            assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == digest[7:]
        assert (await manifest_of(session, hub, "library/redis", "7"))["manifests"][0]["digest"] == \
            hub.seeded.redis_amd64


async def test_a_corrupted_blob_fails_the_clients_verification(hub, home):
    digest, size, original = busybox_amd64_layer(hub)
    hub.corrupt_blob(digest)
    refused = await kura(home, "pull", f"{hub.registry_host}/library/busybox", "--platform", "linux/amd64", "-q")
    assert f"digest mismatch for blob: expected {digest}" in one_line_error(refused)
    assert await stored_images(home) == []

    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/busybox:pull")
        url = f"{hub.registry_url}/v2/library/busybox/blobs/{digest}"
        async with session.get(url, headers=headers) as r:
            served = await r.read()
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
            assert int(r.headers["Content-Length"]) == size
        assert len(served) == size and sum(a != b for a, b in zip(served, original)) == 1
        async with session.get(url, headers={**headers, "Range": f"bytes={size // 2}-"}) as r:
            assert r.status == 206 and (await r.read())[0] != original[size // 2]  # the same byte, resumed

    hub.corrupt_blob(digest, False)
    pulled = await kura(home, "pull", f"{hub.registry_host}/library/busybox", "--platform", "linux/amd64", "-q")
    assert pulled.returncode == 0, pulled.stderr


async def test_fail_with_answers_every_request_until_cleared(hub):
    digest, _, _ = busybox_amd64_layer(hub)
    blob = f"{hub.registry_url}/v2/library/busybox/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/busybox:pull")
        hub.fail_with(503)
        for url in (f"{hub.registry_url}/v2/", f"{hub.registry_url}/v2/library/busybox/manifests/latest", blob):
            async with session.get(url, headers=headers) as r:
                assert r.status == 503 and (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
        hub.fail_with(None)
        async with session.get(f"{hub.registry_url}/v2/") as r:
            assert r.status == 401

        hub.fail_with(500, times=1, path_contains="/blobs/")
        async with session.get(f"{hub.registry_url}/v2/library/busybox/manifests/latest", headers=headers) as r:
            assert r.status == 200
        statuses = []
        for _ in range(2):
            async with session.get(blob, headers=headers) as r:
                statuses.append(r.status)
        assert statuses == [500, 200]
    assert hub.count(status=503) == 3


async def test_slow_and_held_blob_bodies_reach_the_client_piece_by_piece(hub):
    digest, size, original = busybox_amd64_layer(hub)
    url = f"{hub.registry_url}/v2/library/busybox/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/busybox:pull")
        hub.hold_blobs(after_bytes=32 * 1024)
        async with session.get(url, headers=headers) as r:
            first = await r.content.readexactly(32 * 1024)
            with pytest.raises(asyncio.TimeoutError):  # the hub holds the rest
                await asyncio.wait_for(r.content.readexactly(1), 0.3)
            hub.release_blobs()
            body = first + await r.read()
        assert body == original

        hub.slow_blobs(delay=0.05, chunk_bytes=size // 8 + 1)  # 8 pieces, 0.4 s at least
        started = time.monotonic()
        async with session.get(url, headers=headers) as r:
            await r.content.readexactly(1)
            first_byte = time.monotonic() - started
            body = await r.read()
        total = time.monotonic() - started
        assert len(body) == size - 1 and total >= 0.35 and first_byte < total - 0.3
        hub.slow_blobs(bytes_per_second=size / 0.4)  # 16 KiB pieces, about 0.4 s in all
        started = time.monotonic()
        async with session.get(url, headers=headers) as r:
            assert await r.read() == original
        assert time.monotonic() - started >= 0.35
        hub.slow_blobs()
        async with session.get(url, headers=headers) as r:
            assert await r.read() == original


async def test_tags_move_when_the_hub_is_told(hub, home):
    await hub.retag("library/redis", "7", hub.seeded.redis_arm64)
    async with aiohttp.ClientSession() as session:
        headers = await token(session, hub, "repository:library/redis:pull")
        async with session.head(f"{hub.registry_url}/v2/library/redis/manifests/7", headers=headers) as r:
            assert r.headers["Docker-Content-Digest"] == hub.seeded.redis_arm64
    assert await hub.resolve("library/redis", "latest") == hub.seeded.redis_index
    with pytest.raises(ValueError):
        await hub.retag("library/redis", "7", hub.seeded.debian)  # not in library/redis

    pushed = await hub.push_image("library/redis", "7")
    assert pushed not in (hub.seeded.redis_arm64, hub.seeded.redis_amd64)
    pulled = await kura(home, "pull", f"{hub.registry_host}/library/redis:7", "-q")
    assert pulled.returncode == 0, pulled.stderr
    assert await stored_images(home) == [(f"{hub.registry_host}/library/redis:7", pushed)]
    assert await hub.delete_tag("library/redis", "7")
    assert await hub.resolve("library/redis", "7") is None


async def test_each_hub_is_a_cheap_private_copy(hub, tmp_path):
    started = time.monotonic()
    async with emulated_hub(tmp_path / "second") as second:
        assert time.monotonic() - started < 2
        assert second.registry.port != hub.registry.port
        layer = json.loads(blob_file(hub, hub.seeded.redis_amd64).read_bytes())["layers"][0]["digest"]
        assert os.stat(blob_file(second, layer)).st_ino == os.stat(blob_file(hub, layer)).st_ino
        await second.retag("library/redis", "7", hub.seeded.redis_arm64)
        assert await hub.resolve("library/redis", "7") == hub.seeded.redis_index


async def test_blob_gets_can_be_redirected_to_a_cdn_on_another_port(hub, home):
    digest, size, original = busybox_amd64_layer(hub)
    hub.redirect_blobs()
    pulled = await kura(home, "pull", f"{hub.registry_host}/library/busybox", "--platform", "linux/amd64", "-q")
    assert pulled.returncode == 0, pulled.stderr
    assert hub.count("GET", "/blobs/", 307) == 2 and hub.count("GET", "/blobs/", 200) == 0  # config, layer
    assert hub.count("GET", "/registry-v2/", 200, among=hub.cdn_requests) == 2
    assert not any(s.had_authorization for s in hub.cdn_requests)  # no credentials to another host

    async with aiohttp.ClientSession() as session:
        url = f"{hub.registry_url}/v2/library/busybox/blobs/{digest}"
        async with session.get(url, allow_redirects=False) as r:
            assert r.status == 401  # authorization first, as always
        headers = await token(session, hub, "repository:library/busybox:pull")
        async with session.head(url, headers=headers) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == size  # HEAD stays here
        async with session.get(url, headers=headers, allow_redirects=False) as r:
            assert r.status == 307
            location = r.headers["Location"]
        assert location.startswith(f"http://127.0.0.1:{hub.cdn.port}/registry-v2/docker/registry/v2/blobs/sha256/")
        hub.corrupt_blob(digest)  # the CDN serves the same faults
        async with session.get(location) as r:
            served = await r.read()
            assert r.status == 200 and "Docker-Content-Digest" not in r.headers
        assert len(served) == size and served != original
        async with session.get(f"{hub.registry_url}/v2/library/busybox/blobs/sha256:{'0' * 64}",
                               headers=headers, allow_redirects=False) as r:
            assert r.status == 404  # unknown blobs are not redirected
