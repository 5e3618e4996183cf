"""/healthz, /readyz and /metrics over the API: open to anyone (metrics unless a token is
configured), readiness that names the failing check, and metrics counted by route template
(never a path or a repository name), bytes, uploads in progress, failed logins, garbage
collections, the pull-through cache, and what the store holds. (Workers adding up:
test_e2e_monitoring.py.)"""

from __future__ import annotations

import asyncio
import base64
import shutil
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from registry.app import collect_garbage, make_app
from registry.auth import htpasswd
from registry.auth.config import parse as parse_auth
from registry.config import Config
from registry.monitoring import health
from registry.monitoring.usage import Schedule
from registry.proxy.config import parse as parse_proxies
from tests.support.client import sha256
from tests.support.mounts import fill, remount, tmpfs
from tests.support.servers import free_port

from .conftest import push_image, serve_app, upload_blob

TOKEN = "s3cret-metrics-token-0123"
MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"


async def scrape(client, headers: dict | None = None) -> dict[tuple, float]:
    """/metrics read with prometheus_client's own parser: (sample name, sorted labels) -> value."""
    r = await client.get("/metrics", headers=headers or {})
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await r.text()) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def requests(samples: dict, route: str, method: str = "GET", status: int = 200) -> float:
    return value(samples, "kura_http_requests_total", route=route, method=method, status=str(status)) or 0.0


# -- health -----------------------------------------------------------------------------
async def test_healthz_and_readyz_need_no_auth(aiohttp_client, config):
    htpasswd.set_user(config.root / "auth" / "htpasswd", "alice", "alice-password", cost=4)
    client = await aiohttp_client(make_app(replace(config, auth=parse_auth({"mode": "htpasswd"}))))
    assert (await client.get("/v2/")).status == 401
    r = await client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 200 and body["status"] == "ready", body
    assert set(body["checks"]) == {"storage"}
    assert body["checks"]["storage"]["status"] == "ok"
    assert body["checks"]["storage"]["duration_seconds"] > 0


def store_check(client) -> health.CachedCheck:
    return client.server.app[health.READINESS].store


async def test_readyz_is_503_naming_the_store_when_it_cannot_be_written(client, config):
    store_check(client).max_age = 0
    tmp = config.root / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory: no file can be made in it")  # stops root too, unlike a chmod
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 503, body
    assert body["status"] == "not ready"
    assert body["checks"]["storage"]["status"] == "failed"
    assert str(tmp) in body["checks"]["storage"]["error"]
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v2/")).status == 200  # never fails because a check did
    tmp.unlink()
    tmp.mkdir()
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["checks"]["storage"]["status"] == "ok"


async def test_a_full_store_is_degraded_and_a_read_only_one_not_ready(aiohttp_client, tmp_path):
    with tmpfs(tmp_path / "volume", "4m") as volume:
        client = await serve_app(aiohttp_client, replace(Config(), root=volume / "data", access_log=False))
        store_check(client).max_age = 0
        fill(volume / "filler")
        r = await client.get("/readyz")
        body = await r.json()
        assert r.status == 200 and body["status"] == "degraded", body  # pulls still work
        assert body["checks"]["storage"]["status"] == "degraded"
        assert "full" in body["checks"]["storage"]["error"]
        (volume / "filler").unlink()
        remount(volume, "ro")
        try:
            r = await client.get("/readyz")
            body = await r.json()
            assert r.status == 503 and body["checks"]["storage"]["status"] == "failed", body
            assert "read-only" in body["checks"]["storage"]["error"].lower()
        finally:
            remount(volume, "rw")
        await client.close()


async def test_a_poll_storm_runs_the_store_check_once(client):
    store_check(client).max_age = 3600
    answers = await asyncio.gather(*(client.get("/readyz") for _ in range(20)))
    checks = {(await r.json())["checks"]["storage"]["checked_at"] for r in answers}
    assert len(checks) == 1  # concurrent polls shared one run
    r = await client.get("/readyz")
    assert (await r.json())["checks"]["storage"]["checked_at"] in checks  # and later ones its result


async def test_readyz_in_token_mode_checks_the_signing_key(aiohttp_client, config):
    client = await aiohttp_client(make_app(replace(config, auth=parse_auth({"mode": "token"}))))
    body = await (await client.get("/readyz")).json()
    assert body["checks"]["token_signing_key"]["status"] == "ok", body


async def test_an_upstream_that_does_not_answer_is_degraded_not_unready(aiohttp_client, config):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxies = parse_proxies([{"prefix": "docker.io", "remote": down}])
    client = await serve_app(aiohttp_client, replace(config, proxies=proxies))
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 200, body
    assert body["status"] == "degraded"
    assert body["checks"]["upstream:docker.io"]["status"] == "degraded"
    assert down in body["checks"]["upstream:docker.io"]["error"]
    assert body["checks"]["storage"]["status"] == "ok"


# -- metrics ----------------------------------------------------------------------------
async def test_requests_are_counted_by_route_template_never_by_name(client):
    digest, _ = await push_image(client, "secret-team/hidden-app", "v1", layer=b"L" * 1000)
    for _ in range(3):
        assert (await client.get("/v2/secret-team/hidden-app/manifests/v1")).status == 200
    assert (await client.head(f"/v2/secret-team/hidden-app/manifests/{digest}")).status == 200
    assert (await client.get("/v2/secret-team/hidden-app/manifests/missing")).status == 404
    assert (await client.get("/v2/secret-team/hidden-app/blobs/" + sha256(b"L" * 1000))).status == 200
    assert (await client.get("/no/such/endpoint")).status == 404
    r = await client.get("/metrics")
    text = await r.text()
    for leak in ("secret-team", "hidden-app", "v1", "missing", digest, "/no/such"):
        assert leak not in text
    samples = await scrape(client)
    assert requests(samples, MANIFEST_ROUTE) == 3
    assert requests(samples, MANIFEST_ROUTE, "HEAD") == 1
    assert requests(samples, MANIFEST_ROUTE, status=404) == 1
    assert requests(samples, MANIFEST_ROUTE, "PUT", 201) == 1
    assert requests(samples, "/v2/{name}/blobs/uploads/", "POST", 201) == 2
    assert requests(samples, BLOB_ROUTE) == 1
    assert requests(samples, "unmatched", status=404) == 1
    assert requests(samples, "/metrics") == 1  # the scrape before this one
    assert value(samples, "kura_http_request_duration_seconds_count", route=MANIFEST_ROUTE, method="GET") == 4
    assert value(samples, "kura_http_received_bytes_total", route="/v2/{name}/blobs/uploads/", method="POST") \
        == 1000 + 2  # the layer and the config `{}`
    assert value(samples, "kura_http_sent_bytes_total", route=BLOB_ROUTE, method="GET") == 1000


async def test_an_upload_in_progress_is_a_gauge(client):
    r = await client.post("/v2/team/app/blobs/uploads/")
    assert r.status == 202
    location = r.headers["Location"]
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_body():
        yield b"first part "
        started.set()
        await release.wait()
        yield b"last part"

    patch = asyncio.ensure_future(client.patch(location, data=slow_body(),
                                               headers={"Content-Type": "application/octet-stream"}))
    await started.wait()
    for _ in range(200):  # until the server has the request (its headers are on their way)
        samples = await scrape(client)
        if value(samples, "kura_uploads_in_progress") == 1:
            break
        await asyncio.sleep(0.01)
    assert value(samples, "kura_uploads_in_progress") == 1
    release.set()
    assert (await patch).status == 202
    samples = await scrape(client)
    assert value(samples, "kura_uploads_in_progress") == 0
    assert requests(samples, "/v2/{name}/blobs/uploads/{uuid}", "PATCH", 202) == 1


async def test_a_token_guards_metrics_and_nothing_else(make_client):
    client = await make_client(metrics_token=TOKEN)
    r = await client.get("/metrics")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        assert (await client.get("/metrics", headers={"Authorization": wrong})).status == 401
    samples = await scrape(client, {"Authorization": f"Bearer {TOKEN}"})
    assert requests(samples, "/metrics", status=401) == 5
    assert (await client.get("/v2/")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_metrics_can_be_turned_off(make_client):
    client = await make_client(metrics_enabled=False)
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/readyz")).status == 200


async def test_failed_logins_are_counted_by_reason(aiohttp_client, config):
    htpasswd.set_user(config.root / "auth" / "htpasswd", "alice", "alice-password", cost=4)
    client = await aiohttp_client(make_app(replace(config, auth=parse_auth({"mode": "htpasswd"}))))

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert (await client.get("/v2/", headers=basic("alice", "wrong"))).status == 401
    assert (await client.get("/v2/", headers=basic("alice", "wrong again"))).status == 401
    assert (await client.get("/v2/", headers=basic("mallory", "x"))).status == 401
    assert (await client.get("/v2/", headers=basic("alice", "alice-password"))).status == 200
    samples = await scrape(client)
    assert value(samples, "kura_auth_failed_logins_total", reason="wrong password") == 2
    assert value(samples, "kura_auth_failed_logins_total", reason="unknown user") == 1
    assert "alice" not in await (await client.get("/metrics")).text()


async def test_garbage_collections_are_counted_with_the_bytes_they_free(aiohttp_client, config):
    app = make_app(replace(config, gc_grace_seconds=0))
    client = await serve_app(aiohttp_client, config, app)
    await upload_blob(client, "team/app", b"nobody references this" * 100)
    report = await collect_garbage(app)
    assert report.bytes_freed == 2200
    samples = await scrape(client)
    assert value(samples, "kura_gc_runs_total", outcome="completed") == 1
    assert value(samples, "kura_gc_freed_bytes_total") == 2200
    assert value(samples, "kura_gc_deleted_blobs_total") == 1
    assert value(samples, "kura_gc_duration_seconds_count") == 1
    assert value(samples, "kura_gc_last_completed_timestamp_seconds") > 0


async def test_what_the_store_holds_is_counted_in_the_background(client):
    await push_image(client, "team/app", "v1", layer=b"a" * 300)
    await push_image(client, "team/app", "v2", layer=b"b" * 300)
    await push_image(client, "other/app", "v1", layer=b"a" * 300)
    samples = await scrape(client)  # starts the count; the answer does not wait for it
    for _ in range(500):
        if value(samples, "kura_storage_blobs") is not None:
            break
        await asyncio.sleep(0.01)
        samples = await scrape(client)
    assert value(samples, "kura_storage_repositories") == 2
    assert value(samples, "kura_storage_manifests") == 3  # each repository's
    assert value(samples, "kura_storage_tags") == 3
    # The shared config `{}`, two layers, two distinct manifests (other/app's is team/app:v1's).
    assert value(samples, "kura_storage_blobs") == 5
    assert value(samples, "kura_storage_bytes") > 600


# -- the pull-through cache -------------------------------------------------------------
@pytest.fixture
async def hub(tmp_path, aiohttp_client):
    """A Kura as the upstream, sending Docker Hub's rate-limit headers."""
    app = make_app(replace(Config(), root=tmp_path / "hub", access_log=False))

    async def rate_limit(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["ratelimit-limit"] = "100;w=21600"
        response.headers["ratelimit-remaining"] = "97;w=21600"

    app.on_response_prepare.append(rate_limit)
    return await aiohttp_client(TestServer(app))


async def test_cache_hits_misses_and_the_upstreams_rate_limit(hub, aiohttp_client, config):
    await push_image(hub, "library/redis", "7", layer=b"redis" * 100)
    proxies = parse_proxies([{"prefix": "docker.io", "remote": f"http://127.0.0.1:{hub.server.port}",
                              "tag_ttl_seconds": 300}])
    client = await serve_app(aiohttp_client, replace(config, proxies=proxies))
    layer = sha256(b"redis" * 100)
    for _ in range(2):
        assert (await client.get("/v2/docker.io/library/redis/manifests/7")).status == 200
        r = await client.get(f"/v2/docker.io/library/redis/blobs/{layer}")
        assert r.status == 200 and await r.read() == b"redis" * 100  # stored once all is read
    samples = await scrape(client)
    for kind in ("manifest", "blob"):
        assert value(samples, "kura_proxy_cache_requests_total", proxy="docker.io", kind=kind, result="miss") == 1
        assert value(samples, "kura_proxy_cache_requests_total", proxy="docker.io", kind=kind, result="hit") == 1
    assert value(samples, "kura_proxy_upstream_requests_total", proxy="docker.io", status="200") >= 2
    assert value(samples, "kura_proxy_upstream_ratelimit_remaining", proxy="docker.io") == 97
    assert value(samples, "kura_proxy_upstream_ratelimit_limit", proxy="docker.io") == 100
    assert "library/redis" not in await (await client.get("/metrics")).text()
    body = await (await client.get("/readyz")).json()
    assert body["status"] == "ready" and body["checks"]["upstream:docker.io"]["status"] == "ok", body


def test_one_worker_counts_the_store_at_a_time_and_not_again_within_the_interval(tmp_path):
    """Two workers' schedules over one shared file (as in the multiprocess directory)."""
    first, second = Schedule(3600, tmp_path / "usage.lock"), Schedule(3600, tmp_path / "usage.lock")
    assert first.begin()
    assert not second.begin()  # the first one counts now
    first.end()
    assert not second.begin() and not first.begin()  # counted moments ago
    due = Schedule(0, tmp_path / "usage.lock")
    assert due.begin()
    due.end()
