"""The client sends credentials (Basic password or Bearer token) only to the registry's own
scheme+host+port. A URL the registry names elsewhere (an upload Location, a tag list's Link
`rel="next"`, a redirect) is followed without them, as containerd does; a token realm may
never downgrade HTTPS to plain HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ocispec.reference import Reference
from puller import push as push_module
from puller.credentials import Credentials
from puller.push import PushOptions, Source, push
from puller.registries import Endpoint, Registries
from puller.remote import list_tags
from puller.transport import AuthError, RegistryClient, same_origin

PASSWORD = "bob:registry-password"
TOKEN = "registry-bearer-token"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Elsewhere:
    """A second listener on 127.0.0.1 (another port): records what reaches it, and plays an
    upload endpoint and a tag list page. With `demand_auth` it answers 401 to everything."""

    def __init__(self, demand_auth: bool = False):
        self.demand_auth = demand_auth
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.received = bytearray()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def authorizations(self) -> list[str]:
        return [auth for _, _, auth in self.requests if auth is not None]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        if self.demand_auth:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="elsewhere"'})
        if request.path.endswith("/tags/list"):
            return web.json_response({"name": "app", "tags": ["from-elsewhere"]})
        if request.method == "PATCH":
            self.received += await request.read()
            return web.Response(status=202, headers={"Location": request.path,
                                                     "Range": f"0-{len(self.received) - 1}"})
        if request.method == "GET":  # upload status
            return web.Response(status=204, headers={"Location": request.path,
                                                     "Range": f"0-{max(len(self.received) - 1, 0)}"})
        if request.method == "PUT":
            self.received += await request.read()
            if sha256(bytes(self.received)) != request.query.get("digest"):
                return web.Response(status=400)
            self.received.clear()
            return web.Response(status=201, headers={"Docker-Content-Digest": request.query["digest"]})
        return web.Response(status=405)


class Hostile:
    """A registry on 127.0.0.1 that wants Basic or Bearer auth and names `elsewhere` as the
    place for uploads and for the next page of tags."""

    def __init__(self, scheme: str, elsewhere: str):
        self.scheme = scheme
        self.elsewhere = elsewhere
        self.manifests: dict[str, bytes] = {}
        self.token_requests = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/token", self.token)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def authorized(self, request: web.Request) -> bool:
        expected = ("Basic " + base64.b64encode(PASSWORD.encode()).decode() if self.scheme == "basic"
                    else f"Bearer {TOKEN}")
        return request.headers.get("Authorization") == expected

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"token": TOKEN, "expires_in": 300})

    async def handle(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            challenge = ('Basic realm="hostile"' if self.scheme == "basic"
                         else f'Bearer realm="{request.url.origin()}/token",service="hostile"')
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        path = request.path
        if path == "/v2/":
            return web.Response(status=200)
        if request.method == "HEAD" and "/blobs/" in path:
            return web.Response(status=404)
        if request.method == "POST" and path.endswith("/blobs/uploads/"):
            return web.Response(status=202, headers={"Location": f"{self.elsewhere}/upload/session-1"})
        if request.method == "PUT" and "/manifests/" in path:
            data = await request.read()
            self.manifests[path.rsplit("/", 1)[1]] = data
            return web.Response(status=201, headers={"Docker-Content-Digest": sha256(data)})
        if path.endswith("/tags/list"):
            return web.json_response({"name": "app", "tags": ["here"]},
                                     headers={"Link": f'<{self.elsewhere}/v2/app/tags/list?last=here>; rel="next"'})
        return web.Response(status=404)


def image_source(root: Path, layer: bytes) -> Source:
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                    "size": len(layer)}]}).encode()
    for data in (config, layer, manifest):
        path = root / "blobs" / "sha256" / sha256(data)[7:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Source(root, {"mediaType": MANIFEST, "digest": sha256(manifest), "size": len(manifest)})


@pytest.fixture
def listeners(aiohttp_server):
    async def start(scheme: str, demand_auth: bool = False) -> tuple[Hostile, Elsewhere, str]:
        elsewhere = Elsewhere(demand_auth)
        other = await aiohttp_server(elsewhere.app)
        hostile = Hostile(scheme, f"http://127.0.0.1:{other.port}")
        server = await aiohttp_server(hostile.app)
        return hostile, elsewhere, f"127.0.0.1:{server.port}"
    return start


def credentials(host: str) -> Credentials:
    user, password = PASSWORD.split(":")
    return Credentials(user, password)


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
async def test_push_follows_a_foreign_upload_location_without_credentials(listeners, tmp_path, monkeypatch,
                                                                          scheme, chunked):
    hostile, elsewhere, host = await listeners(scheme)
    if chunked:  # PATCH chunks, then the closing PUT, all at the Location the registry named
        monkeypatch.setattr(push_module, "MONOLITHIC_LIMIT", 16)
        monkeypatch.setattr(push_module, "DEFAULT_CHUNK", 64)
    source = image_source(tmp_path / "layout", b"layer bytes " * 20)
    digest, counts = await push(source, Reference.parse(f"{host}/app:v1"), Registries(), credentials,
                                PushOptions(jobs=1))
    assert digest == source.top["digest"] and counts["uploaded"] == 2
    assert sha256(hostile.manifests["v1"]) == digest  # the registry itself still got its credentials
    methods = {method for method, _, _ in elsewhere.requests}
    assert methods == ({"PATCH", "PUT"} if chunked else {"PUT"})
    assert elsewhere.authorizations() == []


async def test_push_fails_cleanly_when_the_foreign_location_wants_credentials(listeners, tmp_path):
    hostile, elsewhere, host = await listeners("basic", demand_auth=True)
    source = image_source(tmp_path / "layout", b"layer")
    with pytest.raises(AuthError, match="Kura sends them only to the registry itself"):
        await push(source, Reference.parse(f"{host}/app:v1"), Registries(), credentials, PushOptions(jobs=1))
    assert elsewhere.requests and elsewhere.authorizations() == []
    assert hostile.manifests == {}


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
async def test_tags_follow_a_foreign_link_without_credentials(listeners, scheme):
    hostile, elsewhere, host = await listeners(scheme)
    tags = await list_tags(Reference.parse(f"{host}/app"), Registries(), credentials)
    assert tags == ["here", "from-elsewhere"]
    assert [(m, p) for m, p, _ in elsewhere.requests] == [("GET", "/v2/app/tags/list")]
    assert elsewhere.authorizations() == []


def test_same_origin_knows_default_ports_and_case():
    assert same_origin("https://Registry.Example/v2/", "https://registry.example:443/upload")
    assert same_origin("HTTP://registry.example:80/v2/", "http://registry.example/x")
    assert same_origin("http://[::1]:5000/v2/", "http://[::1]:5000/x")
    assert not same_origin("https://registry.example/v2/", "http://registry.example/v2/")
    assert not same_origin("https://registry.example/v2/", "https://registry.example:8443/v2/")
    assert not same_origin("http://127.0.0.1:5000/v2/", "http://127.0.0.1:5001/v2/")
    assert not same_origin("https://registry.example/v2/", "https://registry.example.evil/v2/")
    assert not same_origin("https://registry.example/v2/", "https://user@registry.example.evil/v2/")


@pytest.mark.parametrize("realm_scheme", ["http", "HTTP", "Http"])
async def test_https_registry_cannot_send_the_password_to_a_plain_http_realm(aiohttp_server, tmp_path,
                                                                              realm_scheme):
    from tests.test_serve_options import self_signed
    cert, key = self_signed(tmp_path)
    realm_hits = []

    async def realm(request):
        realm_hits.append(dict(await request.post()) if request.method == "POST" else dict(request.headers))
        return web.json_response({"token": TOKEN})

    realm_app = web.Application()
    realm_app.router.add_route("*", "/token", realm)
    realm_server = await aiohttp_server(realm_app)

    async def registry(request):
        return web.Response(status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{realm_scheme}://127.0.0.1:{realm_server.port}/token"'})

    registry_app = web.Application()
    registry_app.router.add_route("*", "/{tail:.*}", registry)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    registry_server = await aiohttp_server(registry_app, ssl=server_context)

    trust = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        client = RegistryClient(session, Endpoint(f"127.0.0.1:{registry_server.port}", "app"),
                                Credentials("bob", "registry-password"))
        assert await client.base_url() == f"https://127.0.0.1:{registry_server.port}"
        with pytest.raises(AuthError, match="plain-HTTP realm"):
            async with client.request("GET", client.repo_path("tags/list"), scope="repository:app:pull"):
                pass
    assert realm_hits == []
