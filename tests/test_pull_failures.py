"""The client against a misbehaving registry: every failure is a clear error or a recovery,
and nothing unverified ever lands in the store."""

from __future__ import annotations

import os

import pytest
from aiohttp.test_utils import TestServer

from ocispec.reference import Reference
from puller.credentials import Credentials
from puller.pull import PullOptions, VerificationError, pull
from puller.registries import Registries
from puller.store import Store
from puller.transport import AuthError, RateLimited, RegistryError
from tests.support.faulty_registry import Faults, image, make_app, make_cdn, sha256

LAYER = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
async def faulty(aiohttp_server):
    async def start(faults: Faults) -> TestServer:
        return await aiohttp_server(make_app(LAYER, faults))
    return start


async def run_pull(server, store, credentials=None):
    ref = Reference.parse(f"127.0.0.1:{server.port}/app:v1")
    return await pull(ref, store, Registries(), lambda host: credentials, PullOptions(jobs=2))


def blob_files(store: Store) -> set[str]:
    return {p.name for p in (store.root / "blobs").rglob("*") if p.is_file()}


def no_partial_files(store: Store) -> bool:
    """Nothing unverified kept: no temp file, no partial download to resume."""
    return not list(store.scratch.glob("*.partial")) and not list(store.scratch.glob("partial/*"))


async def test_clean_pull(faulty, tmp_path):
    store = Store(tmp_path / "store")
    result = await run_pull(await faulty(Faults()), store)
    manifest, config, _ = image(LAYER)
    assert str(result.digest) == sha256(manifest)
    assert blob_files(store) == {sha256(x)[7:] for x in (manifest, config, LAYER)}
    assert store.find(str(result.reference)).descriptor["digest"] == sha256(manifest)


async def test_digest_mismatch_refused(faulty, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(VerificationError, match=f"expected {sha256(LAYER)}, got sha256:"):
        await run_pull(await faulty(Faults(corrupt_layer=True)), store)
    assert sha256(LAYER)[7:] not in blob_files(store)
    assert no_partial_files(store) and store.images() == []


async def test_size_overrun_refused(faulty, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(VerificationError, match="larger than"):
        await run_pull(await faulty(Faults(oversize_layer=True)), store)
    assert sha256(LAYER)[7:] not in blob_files(store) and no_partial_files(store)


async def test_dropped_connection_resumes_with_range(faulty, tmp_path):
    faults = Faults(drop_after=1024 * 1024)
    store = Store(tmp_path / "store")
    await run_pull(await faulty(faults), store)
    layer_requests = [r for r in faults.requests if r.startswith(f"GET blob {sha256(LAYER)[:15]}")]
    assert layer_requests[0].endswith("range=None")
    assert layer_requests[-1].startswith(f"GET blob {sha256(LAYER)[:15]} range=bytes=") and \
        not layer_requests[-1].endswith("bytes=0-")
    assert (store.root / "blobs" / "sha256" / sha256(LAYER)[7:]).read_bytes() == LAYER


async def test_missing_blob(faulty, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError, match="not found"):
        await run_pull(await faulty(Faults(missing_layer=True)), store)
    assert store.images() == []


async def test_bad_credentials(faulty, tmp_path):
    server = await faulty(Faults(require_password="bob:right"))
    with pytest.raises(AuthError, match="refused access"):
        await run_pull(server, Store(tmp_path / "store"), Credentials("bob", "wrong"))
    await run_pull(server, Store(tmp_path / "store"), Credentials("bob", "right"))


async def test_rate_limit(faulty, tmp_path):
    await run_pull(await faulty(Faults(rate_limit_once=True)), Store(tmp_path / "a"))  # recovers
    with pytest.raises(RateLimited, match=r"rate limit reached \(limit 100;w=21600\); retry after 0"):
        await run_pull(await faulty(Faults(rate_limit_always=True)), Store(tmp_path / "b"))


async def test_already_stored_blobs_are_not_downloaded_again(faulty, tmp_path):
    faults = Faults()
    server = await faulty(faults)
    store = Store(tmp_path / "store")
    await run_pull(server, store)
    faults.requests.clear()
    result = await run_pull(server, store)
    assert result.downloaded == 0 and result.reused == 2
    assert not [r for r in faults.requests if r.startswith("GET blob")]


async def test_redirect_to_another_host_gets_no_credentials(faulty, aiohttp_server, tmp_path):
    seen: list[dict] = []
    cdn = await aiohttp_server(make_cdn(LAYER, seen))
    server = await faulty(Faults(require_password="bob:right", redirect_blobs_to=f"http://127.0.0.1:{cdn.port}"))
    store = Store(tmp_path / "store")
    await run_pull(server, store, Credentials("bob", "right"))
    assert len(seen) == 2  # config and layer, both fetched from the CDN
    assert all("Authorization" not in headers for headers in seen)
    assert (store.root / "blobs" / "sha256" / sha256(LAYER)[7:]).read_bytes() == LAYER


async def test_verbose_shows_rate_limit(faulty, tmp_path):
    from puller.progress import Progress

    class Recorder(Progress):
        def __init__(self):
            self.messages = []

        def message(self, text):
            self.messages.append(text)

    recorder = Recorder()
    server = await faulty(Faults(rate_limit_headers=True))
    ref = Reference.parse(f"127.0.0.1:{server.port}/app:v1")
    await pull(ref, Store(tmp_path / "store"), Registries(), lambda host: None,
               PullOptions(progress=recorder, verbose=True))
    assert recorder.messages == [f"127.0.0.1:{server.port} rate limit: 76;w=21600 remaining of 100;w=21600"]


async def test_foreign_layer_urls_are_fetched_without_credentials(aiohttp_server, tmp_path):
    """A layer the registry does not have comes from its descriptor's `urls`, credential-free."""
    import json as _json

    from aiohttp import web
    seen: list[dict] = []
    cdn = await aiohttp_server(make_cdn(LAYER, seen))
    manifest, config, _ = image(LAYER)
    doc = _json.loads(manifest)
    doc["layers"][0]["urls"] = [f"http://127.0.0.1:{cdn.port}/cdn/{sha256(LAYER)}"]
    ordinary = _json.dumps(doc).encode()  # urls on an ordinary layer are not followed
    doc["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    manifest = _json.dumps(doc).encode()

    async def handler(request):
        if request.headers.get("Authorization") != "Basic Ym9iOnJpZ2h0":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if "/manifests/" in request.path:
            body = ordinary if request.path.endswith("/ordinary") else manifest
            return web.Response(body=body, content_type="application/vnd.oci.image.manifest.v1+json")
        if request.path.endswith(sha256(config)):
            return web.Response(body=config)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError, match="not found"):
        await pull(Reference.parse(f"127.0.0.1:{server.port}/app:ordinary"), store, Registries(),
                   lambda host: Credentials("bob", "right"), PullOptions())
    assert seen == []
    await run_pull(server, store, Credentials("bob", "right"))
    assert len(seen) == 1 and "Authorization" not in seen[0]
    assert (store.root / "blobs" / "sha256" / sha256(LAYER)[7:]).read_bytes() == LAYER


async def test_manifest_larger_than_a_socket_buffer(aiohttp_server, tmp_path):
    """A 200 KB manifest arrives in many reads; the 4 MiB limit is what counts."""
    from aiohttp import web
    manifest, config, _ = image(LAYER)
    import json as _json
    doc = _json.loads(manifest)
    doc["annotations"] = {"pad": "x" * 200_000}
    manifest = _json.dumps(doc).encode()

    async def handler(request):
        if "/manifests/" in request.path:
            return web.Response(body=manifest, content_type="application/vnd.oci.image.manifest.v1+json")
        blob = {sha256(config): config, sha256(LAYER): LAYER}[request.match_info["tail"].rsplit("/", 1)[1]]
        return web.Response(body=blob)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    result = await run_pull(server, Store(tmp_path / "store"))
    assert str(result.digest) == sha256(manifest)


async def test_content_type_cannot_override_the_document(aiohttp_server, tmp_path):
    from aiohttp import web
    manifest, config, _ = image(LAYER)

    async def handler(request):
        return web.Response(body=manifest, content_type="application/vnd.oci.image.index.v1+json")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError):
        await run_pull(server, store)  # it tries the layers (the document says manifest) and finds none
    assert store.images() == []


async def test_challenge_from_a_redirect_target_gets_no_password(aiohttp_server, tmp_path):
    from aiohttp import web
    posted = []

    async def evil(request):
        if request.method == "POST":
            posted.append(await request.post())
            return web.json_response({"token": "t"})
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{request.url.origin()}/token"'})

    evil_app = web.Application()
    evil_app.router.add_route("*", "/{tail:.*}", evil)
    evil_server = await aiohttp_server(evil_app)
    faults = Faults(require_password="bob:right", redirect_blobs_to=f"http://127.0.0.1:{evil_server.port}")
    server = await aiohttp_server(make_app(LAYER, faults))
    with pytest.raises(AuthError, match="sends them only to the registry itself"):
        await run_pull(server, Store(tmp_path / "store"), Credentials("bob", "right"))
    assert posted == []
