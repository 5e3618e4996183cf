"""Event notifications through the real API: what is sent, to whom, and that an endpoint
that is down, or answers errors for a while, still gets every event, in order."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import replace

import pytest
from aiohttp import web

from registry.auth import htpasswd
from registry.auth.config import parse as parse_auth
from registry.notify.config import parse
from storage import FilesystemDriver, StorageFull
from tests.conftest import OCI_MANIFEST, push_image, serve_app, upload_blob
from tests.support.client import sha256
from tests.support.event_receiver import EventReceiver

FAST = {"backoff_seconds": 0.05, "max_backoff_seconds": 0.2}


def endpoints(*entries: dict):
    return parse([{**FAST, **entry} for entry in entries])


@pytest.fixture
async def receiver():
    receiver = await EventReceiver().start()
    yield receiver
    await receiver.stop()


def summary(events: list[dict]) -> list[tuple]:
    """(action, repository, what, tag): `what` is the URL's kind, or the digest of a delete."""
    out = []
    for event in events:
        target = event["target"]
        what = target["url"].split("/")[-2] if "url" in target else target.get("digest", "")[:13]
        out.append((event["action"], target["repository"], what, target.get("tag")))
    return out


async def test_push_pull_mount_and_delete_reach_the_endpoint_in_the_reference_format(
        aiohttp_client, config, receiver):
    hooks = endpoints({"url": receiver.url, "headers": {"Authorization": "Bearer s3cret", "X-Env": ["a", "b"]}})
    client = await serve_app(aiohttp_client, replace(config, notifications=hooks))
    digest, manifest = await push_image(client, "team/app", "v1", layer=b"layer bytes")
    layer = sha256(b"layer bytes")
    assert (await client.head("/v2/team/app/manifests/v1")).status == 200  # HEADs are no pulls
    assert (await client.head(f"/v2/team/app/blobs/{layer}")).status == 200
    assert (await client.get("/v2/team/app/manifests/v1")).status == 200
    assert (await client.get(f"/v2/team/app/blobs/{layer}")).status == 200
    r = await client.post(f"/v2/other/blobs/uploads/?mount={layer}&from=team/app")
    assert r.status == 201
    assert (await client.delete(f"/v2/team/app/manifests/{digest}")).status == 202
    assert (await client.delete(f"/v2/other/blobs/{layer}")).status == 202

    events = await receiver.wait_for(9)
    assert summary(await receiver.settle(0.3)) == [
        ("push", "team/app", "blobs", None), ("push", "team/app", "blobs", None),
        ("push", "team/app", "manifests", "v1"),
        ("pull", "team/app", "manifests", "v1"), ("pull", "team/app", "blobs", None),
        ("mount", "other", "blobs", None),
        ("delete", "team/app", digest[:13], None), ("delete", "team/app", "", "v1"),
        ("delete", "other", layer[:13], None),
    ]
    headers = receiver.posts[0][0]
    assert headers["Content-Type"] == "application/vnd.docker.distribution.events.v1+json"
    assert headers["Authorization"] == "Bearer s3cret"
    assert receiver.header_values[0]["X-Env"] == ["a", "b"]

    pushed = events[2]
    assert set(pushed) == {"id", "timestamp", "action", "target", "request", "actor", "source"}
    assert pushed["target"] == {
        "mediaType": OCI_MANIFEST, "size": len(manifest), "digest": digest, "length": len(manifest),
        "repository": "team/app", "url": f"http://{client.server.host}:{client.server.port}/v2/team/app/manifests/{digest}",
        "tag": "v1"}
    assert set(pushed["request"]) == {"id", "addr", "host", "method", "useragent"}
    assert pushed["request"]["method"] == "PUT" and pushed["request"]["addr"].startswith("127.0.0.1:")
    assert pushed["actor"] == {}  # anonymous, as the reference writes it
    assert set(pushed["source"]) == {"addr", "instanceID"}
    assert pushed["timestamp"].endswith("Z") and len(pushed["timestamp"]) == len("2026-01-01T00:00:00.123456789Z")
    assert events[5]["target"]["fromRepository"] == "team/app"
    assert events[6]["target"] == {"digest": digest, "repository": "team/app"}
    assert events[7]["target"] == {"repository": "team/app", "tag": "v1"}
    assert events[6]["request"]["id"] == events[7]["request"]["id"]  # one request, two events
    assert len({event["request"]["id"] for event in events}) == 8
    assert len({event["id"] for event in events}) == 9
    assert not await FilesystemDriver(config.root).pending_outbox(hooks[0].name, 10)  # all delivered, removed


async def test_the_signed_in_user_is_the_actor(aiohttp_client, config, receiver):
    htpasswd.set_user(config.root / "auth" / "htpasswd", "alice", "wonderland-9", cost=4)
    auth = parse_auth({"mode": "htpasswd", "rules": [{"repositories": ["**"], "users": ["*"], "actions": ["*"]}]})
    client = await serve_app(aiohttp_client, replace(config, auth=auth,
                                                     notifications=endpoints({"url": receiver.url})))
    data = b"x"
    r = await client.post(f"/v2/a/blobs/uploads/?digest={sha256(data)}", data=data,
                          headers={"Authorization": "Basic " + base64.b64encode(b"alice:wonderland-9").decode()})
    assert r.status == 201
    assert (await receiver.wait_for(1))[0]["actor"] == {"name": "alice"}


async def test_events_and_repositories_filters(aiohttp_client, config):
    deletes, team = await EventReceiver().start(), await EventReceiver().start()
    try:
        hooks = endpoints({"url": deletes.url, "events": ["delete"]},
                          {"url": team.url, "repositories": ["team/**"], "events": ["push", "delete"]})
        client = await serve_app(aiohttp_client, replace(config, notifications=hooks))
        await push_image(client, "team/app", "v1")
        await push_image(client, "solo", "v1")
        assert (await client.get("/v2/team/app/manifests/v1")).status == 200
        assert (await client.delete("/v2/solo/manifests/v1")).status == 202
        assert (await client.delete("/v2/team/app/manifests/v1")).status == 202
        await deletes.wait_for(2)
        await team.wait_for(4)
        assert summary(await deletes.settle(0.3)) == [("delete", "solo", "", "v1"), ("delete", "team/app", "", "v1")]
        assert [(a, r) for a, r, _, _ in summary(await team.settle(0.3))] == [
            ("push", "team/app")] * 3 + [("delete", "team/app")]
    finally:
        await deletes.stop()
        await team.stop()


async def test_an_endpoint_that_is_down_then_answers_errors_gets_every_event_in_order(aiohttp_client, config):
    receiver = EventReceiver(failures=(503, 500, 503))  # not listening yet, then three errors
    client = await serve_app(aiohttp_client, replace(config, notifications=endpoints({"url": receiver.url})))
    tags = [f"t{n}" for n in range(6)]
    for tag in tags[:3]:
        await push_image(client, "app", tag, layer=tag.encode())
    await receiver.start()
    try:
        for tag in tags[3:]:
            await push_image(client, "app", tag, layer=tag.encode())
        await receiver.wait_for(18)
        events = await receiver.settle(0.3)
        assert [e["target"].get("tag") for e in events if "tag" in e["target"]] == tags
        assert len(events) == 18 and len({e["id"] for e in events}) == 18  # each once
        assert receiver.refused == 3
    finally:
        await receiver.stop()


async def test_two_processes_on_one_store_deliver_each_event_once_in_order(aiohttp_client, config, receiver):
    hooks = endpoints({"url": receiver.url})
    first = await serve_app(aiohttp_client, replace(config, notifications=hooks))
    second = await serve_app(aiohttp_client, replace(config, notifications=hooks))
    for n in range(4):
        await push_image(first if n % 2 else second, "app", f"t{n}", layer=b"%d" % n)
    await receiver.wait_for(12)
    events = await receiver.settle(0.3)
    assert [e["target"]["tag"] for e in events if "tag" in e["target"]] == ["t0", "t1", "t2", "t3"]
    assert len(events) == 12
    assert len({e["source"]["instanceID"] for e in events}) == 2


async def test_an_event_past_its_maximum_age_goes_to_the_failed_folder(aiohttp_client, config, caplog):
    receiver = EventReceiver()  # never listening
    hooks = endpoints({"url": receiver.url, "max_age_seconds": 0.2})
    client = await serve_app(aiohttp_client, replace(config, notifications=hooks))
    with caplog.at_level(logging.WARNING, logger="kura.notify"):
        await upload_blob(client, "a", b"never delivered")
        driver = FilesystemDriver(config.root)
        async with asyncio.timeout(60):
            while not await driver.failed_outbox(hooks[0].name):
                await asyncio.sleep(0.05)
    records = await driver.failed_outbox(hooks[0].name)
    assert len(records) == 1 and json.loads(records[0].data)["action"] == "push"
    assert not await driver.pending_outbox(hooks[0].name, 10)
    assert f"gave up on the event(s) of {records[0].key}" in caplog.text
    assert "delivery failed: ClientConnectorError" in caplog.text  # the tries before, and why they failed


async def test_no_endpoint_no_outbox(client, config):
    await push_image(client, "app", "v1")
    assert not (config.root / "outbox").exists()


async def test_pulls_served_by_the_pull_through_cache(aiohttp_client, config, receiver, tmp_path):
    from registry.proxy.config import parse as parse_proxies

    upstream = await serve_app(aiohttp_client, replace(config, root=tmp_path / "upstream"))
    digest, manifest = await push_image(upstream, "library/redis", "7", layer=b"redis layer")
    proxies = parse_proxies([{"prefix": "docker.io", "remote": f"http://127.0.0.1:{upstream.server.port}"}])
    cache = await serve_app(aiohttp_client, replace(config, proxies=proxies,
                                                    notifications=endpoints({"url": receiver.url})))
    assert (await cache.get("/v2/docker.io/library/redis/manifests/7")).status == 200
    layers = [d["digest"] for d in json.loads(manifest)["layers"]]
    for _ in range(2):  # from the upstream while it arrives, then from the store
        r = await cache.get(f"/v2/docker.io/library/redis/blobs/{layers[0]}")
        assert r.status == 200 and await r.read() == b"redis layer"
    assert (await cache.head(f"/v2/docker.io/library/redis/blobs/{layers[0]}")).status == 200
    await receiver.wait_for(3)
    events = await receiver.settle(0.3)
    assert summary(events) == [("pull", "docker.io/library/redis", "manifests", "7"),
                               ("pull", "docker.io/library/redis", "blobs", None),
                               ("pull", "docker.io/library/redis", "blobs", None)]
    assert events[0]["target"]["digest"] == digest
    assert [e["target"]["size"] for e in events[1:]] == [len(b"redis layer")] * 2


async def test_events_of_requests_at_the_same_moment_share_a_write(aiohttp_client, config):
    receiver = EventReceiver()  # down: the events stay in the outbox
    hooks = endpoints({"url": receiver.url, "events": ["pull"]})
    client = await serve_app(aiohttp_client, replace(config, notifications=hooks))
    await push_image(client, "app", "v1")
    answers = await asyncio.gather(*(client.get("/v2/app/manifests/v1") for _ in range(20)))
    assert [r.status for r in answers] == [200] * 20
    records = await FilesystemDriver(config.root).pending_outbox(hooks[0].name, 100)
    assert sum(r.data.count(b"\n") + 1 for r in records) == 20
    assert len(records) < 20
    await receiver.start()
    try:
        events = await receiver.wait_for(20)
        assert [e["action"] for e in await receiver.settle(0.3)] == ["pull"] * 20
        assert len(receiver.posts) == 1  # one envelope: fewer than BATCH_EVENTS waited
        assert len({e["request"]["id"] for e in events}) == 20
    finally:
        await receiver.stop()


class FullOutbox(FilesystemDriver):
    async def append_outbox(self, outbox: str, data: bytes) -> str:
        raise StorageFull("no space left on device")


async def test_a_failed_outbox_write_costs_the_event_not_the_request(aiohttp_client, config, caplog):
    from registry.app import make_app
    from registry.notify.delivery import NOTIFIER

    hooks = endpoints({"url": "http://127.0.0.1:9/never"})
    app = make_app(replace(config, notifications=hooks), FullOutbox(config.root))
    client = await serve_app(aiohttp_client, config, app)
    with caplog.at_level(logging.ERROR, logger="kura.notify"):
        digest = await upload_blob(client, "a", b"stored all the same")
    assert (await client.get(f"/v2/a/blobs/{digest}")).status == 200
    assert "could not queue an event (no space left on device), lost: {" in caplog.text
    assert f'"digest": "{digest}"' in caplog.text
    assert app[NOTIFIER].lost[hooks[0].name] == 2 and app[NOTIFIER].queued[hooks[0].name] == 0


async def test_handlers_outside_v2_name_their_user(aiohttp_client, config, receiver):
    """The web UI deletes tags outside /v2 (no grant there): it names the signed-in user."""
    from registry.app import make_app
    from registry.notify import events as notify

    async def delete_from_elsewhere(request):
        await notify.emit(request, "delete", notify.deleted("a", tag="old"), user="carol")
        return web.Response(status=204)

    settings = replace(config, notifications=endpoints({"url": receiver.url}))
    app = make_app(settings)
    app.router.add_post("/elsewhere", delete_from_elsewhere)
    client = await serve_app(aiohttp_client, settings, app)
    assert (await client.post("/elsewhere")).status == 204
    (event,) = await receiver.wait_for(1)
    assert event["actor"] == {"name": "carol"} and event["target"] == {"repository": "a", "tag": "old"}
