"""The distribution API served from the S3 driver (real SeaweedFS): the handlers are the
same; what differs is what an object store adds (redirects, an unreachable store)."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import aiohttp
import pytest

from registry.app import make_app
from registry.monitoring.health import READINESS
from storage.s3 import S3Driver
from storage.s3_objects import S3Location
from tests.conftest import serve_app
from tests.support.client import RegistryClient, sha256
from tests.support.paths import IMAGES, REPO
from tests.support.tcp_relay import TcpRelay

pytestmark = pytest.mark.e2e


@pytest.fixture
def location(s3_bucket) -> S3Location:
    return S3Location(s3_bucket.endpoint, s3_bucket.region, s3_bucket.bucket, f"api-{uuid.uuid4().hex[:10]}",
                      s3_bucket.access_key, s3_bucket.secret_key)


async def s3_client(aiohttp_client, config, driver):
    client = await serve_app(aiohttp_client, config, make_app(config, driver))
    return client, RegistryClient(client.session, str(client.make_url("")))


async def test_push_and_pull_an_image_byte_for_byte(aiohttp_client, config, location):
    client, registry = await s3_client(aiohttp_client, config, S3Driver(location))
    layout = IMAGES / "redis"
    digest = await registry.push_layout(layout, "library/redis", "7")
    r = await client.get("/v2/library/redis/manifests/7", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    manifest = json.loads(await r.read())
    for layer in manifest["layers"]:
        r = await client.get(f"/v2/library/redis/blobs/{layer['digest']}")
        assert r.status == 200
        data = await r.read()
        assert sha256(data) == layer["digest"] and len(data) == layer["size"]
    r = await client.get(f"/v2/library/redis/blobs/{manifest['layers'][0]['digest']}", headers={"Range": "bytes=10-19"})
    assert r.status == 206 and len(await r.read()) == 10
    r = await client.get("/v2/_catalog")
    assert (await r.json())["repositories"] == ["library/redis"]
    r = await client.get("/v2/library/redis/tags/list")
    assert (await r.json())["tags"] == ["7"]


async def test_redirect_sends_blob_gets_to_a_presigned_url(aiohttp_client, config, location):
    client, registry = await s3_client(aiohttp_client, config, S3Driver(location, redirect=True))
    data = os.urandom(300_000)
    digest = await registry.push_blob("team/app", data)
    r = await client.get(f"/v2/team/app/blobs/{digest}", allow_redirects=False)
    assert r.status == 307 and r.headers["Docker-Content-Digest"] == digest
    url = r.headers["Location"]
    assert url.startswith(location.endpoint) and "X-Amz-Signature=" in url
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as fetched:
            assert fetched.status == 200 and await fetched.read() == data
        async with session.get(url, headers={"Range": "bytes=5-9"}) as fetched:
            assert fetched.status == 206 and await fetched.read() == data[5:10]
    r = await client.head(f"/v2/team/app/blobs/{digest}")  # HEAD is answered by Kura itself
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
    r = await client.get(f"/v2/other/blobs/{digest}", allow_redirects=False)
    assert r.status == 404  # access and links are checked before any URL is handed out


async def test_a_store_that_goes_away_answers_503_in_the_spec_format_and_recovers(aiohttp_client, config, location):
    endpoint = urlsplit(location.endpoint)
    relay = await TcpRelay(endpoint.hostname, endpoint.port).start()
    through_relay = replace(location, endpoint=f"http://{relay.address}")
    client, registry = await s3_client(aiohttp_client, config, S3Driver(through_relay))
    digest = await registry.push_blob("team/app", b"stored before the outage")
    await relay.cut()
    r = await client.get(f"/v2/team/app/blobs/{digest}")
    assert r.status == 503
    error = (await r.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "storage is unavailable" in error["message"]
    assert r.headers["Retry-After"]
    r = await client.post("/v2/team/app/blobs/uploads/")
    assert r.status == 503
    await relay.start()  # same port again
    r = await client.get(f"/v2/team/app/blobs/{digest}")
    assert r.status == 200 and await r.read() == b"stored before the outage"
    await relay.cut()


def test_serve_creates_a_missing_bucket_and_says_so(s3_bucket, tmp_path, config):
    import logging

    from registry.config import S3Settings
    from registry.startup import StartupError, open_store

    bucket = f"fresh-{uuid.uuid4().hex[:10]}"
    settings = S3Settings(bucket=bucket, endpoint=s3_bucket.endpoint, access_key=s3_bucket.access_key,
                          secret_key=s3_bucket.secret_key)
    s3_config = replace(config, storage_driver="s3", s3=settings)
    driver, notes = open_store(s3_config)
    assert isinstance(driver, S3Driver) and (logging.INFO, f"created the bucket {bucket}") in notes
    driver, notes = open_store(s3_config)  # the second start finds it
    assert not any("created the bucket" in text for _, text in notes)
    wrong = replace(s3_config, s3=replace(settings, secret_key="not-the-secret"))
    with pytest.raises(StartupError, match="403 Forbidden|SignatureDoesNotMatch|AccessDenied"):
        open_store(wrong)


CHILD_CHECK = """
import sys
from dataclasses import replace
from registry.config import Config, S3Settings
from registry.startup import StartupError, open_store
endpoint, access_key, secret_key, bucket, root = sys.argv[1:]
settings = S3Settings(bucket=bucket, endpoint=endpoint, access_key=access_key, secret_key=secret_key)
config = replace(Config(), root=root, storage_driver="s3", s3=settings)
_, notes = open_store(config, probe_in_child=True)
print([text for _, text in notes])
try:
    open_store(replace(config, s3=replace(settings, secret_key="not-the-secret")), probe_in_child=True)
except StartupError as exc:
    print("refused:", exc)
"""


def test_the_check_in_a_child_process_reports_as_the_one_in_process(s3_bucket, tmp_path):
    # In a fresh interpreter, as `kura serve` runs it: this test process has used the S3
    # client already, and a child forked from it would inherit its runtime without threads.
    import subprocess
    import sys

    bucket = f"fresh-{uuid.uuid4().hex[:10]}"
    ran = subprocess.run([sys.executable, "-c", CHILD_CHECK, s3_bucket.endpoint, s3_bucket.access_key,
                          s3_bucket.secret_key, bucket, str(tmp_path / "root")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ran.returncode == 0, ran.stderr
    assert f"created the bucket {bucket}" in ran.stdout
    assert re.search(r"refused: .*(403 Forbidden|SignatureDoesNotMatch|AccessDenied)", ran.stdout), ran.stdout


def test_workers_forked_by_the_supervisor_serve_from_s3(s3_bucket, tmp_path):
    """The S3 client's threads do not survive a fork: the supervisor must not have used it
    before forking its workers (their requests waited forever)."""
    import subprocess

    from tests.support.kura_s3 import start_kura_s3
    from tests.support.servers import stop

    server = start_kura_s3(s3_bucket, tmp_path / "kura", workers=2)
    try:
        def skopeo(source: str, destination: str) -> None:
            subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                            source, destination], check=True, timeout=60, capture_output=True)

        skopeo(f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64", f"docker://{server.host}/workers/busybox:1")
        for number in range(4):  # new connections each time: the kernel spreads them over both workers
            skopeo(f"docker://{server.host}/workers/busybox:1", f"oci:{tmp_path / f'pulled{number}'}:1")
    finally:
        stop(server)


async def test_web_ui_pages_on_s3(aiohttp_client, config, location):
    """The web UI reads everything through the driver: its pages and a delete work on S3."""
    from tests.support.ui_pages import csrf_of, page, seed
    client, _ = await s3_client(aiohttp_client, config, S3Driver(location))
    digests = await seed(client)
    assert 'href="/ui/r/team/multi"' in await page(client, "/ui/")
    tags = await page(client, "/ui/r/team/app")
    assert "-/m/v1" in tags and "linux/amd64" in tags and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", tags)
    image = await page(client, "/ui/r/team/app/-/m/v1")
    assert "GREETING=hello" in image and 'id="layers"' in image and f'-/m/{digests["sbom"]}' in image
    assert "linux/arm64" in await page(client, "/ui/r/team/multi/-/m/latest")
    r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": csrf_of(tags)}, allow_redirects=False)
    assert r.status == 303
    assert "-/m/v2" not in await page(client, "/ui/r/team/app")


async def test_readyz_is_503_while_the_store_is_cut_off_and_ready_after(aiohttp_client, config, location):
    endpoint = urlsplit(location.endpoint)
    relay = await TcpRelay(endpoint.hostname, endpoint.port).start()
    client, _ = await s3_client(aiohttp_client, config, S3Driver(replace(location, endpoint=f"http://{relay.address}")))
    client.server.app[READINESS].store.max_age = 0  # every poll probes the bucket
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["checks"]["storage"]["status"] == "ok"
    await relay.cut()
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 503 and body["checks"]["storage"]["status"] == "failed", body
    assert (await client.get("/healthz")).status == 200
    await relay.start()
    r = await client.get("/readyz")
    assert r.status == 200, await r.text()
    await relay.cut()
