"""A deliberately misbehaving registry for the client's failure tests (in-process aiohttp).

It serves one image (a manifest, a config and one layer) and can be told to lie about a
digest, send more bytes than promised, drop the connection half-way through a blob (and
honour Range on the retry), ignore Range, stall half-way through the layer, answer 503 once,
answer 404, demand credentials, or rate-limit; or, as a hostile registry would, serve any bytes
as a manifest (by tag or digest), any config, any layer media type, and any tag list. Every
layer request's Range is recorded."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = b'{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}'


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Faults:
    corrupt_layer: bool = False        # serve other bytes of the same length
    oversize_layer: bool = False       # append bytes past the descriptor's size
    drop_after: int | None = None      # close the connection after this many layer bytes, once
    missing_layer: bool = False        # 404 for the layer
    require_password: str | None = None  # Basic auth "user:password"
    rate_limit_always: bool = False    # 429 on every blob request
    rate_limit_once: bool = False      # 429 once, then serve
    redirect_blobs_to: str | None = None  # 307 every blob GET to this base URL (a "CDN")
    rate_limit_headers: bool = False   # ratelimit-limit/-remaining on manifests, as Docker Hub sends
    layer_media_type: str = TAR_LAYER  # what the image's manifest calls its layer
    config: bytes = CONFIG             # the image's config blob
    manifests: dict[str, bytes] = field(default_factory=dict)  # tag or digest -> bytes served instead
    tags: object = None                # the tags/list body's "tags" (anything a registry may send)
    ignore_range: bool = False         # always 200 with the whole blob
    stall_after: int | None = None     # send this many layer bytes, then hang until `released` is set
    unavailable_once: bool = False     # 503 for the first manifest request
    released: asyncio.Event = field(default_factory=asyncio.Event)
    layer_bytes_sent: int = 0
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes: more blobs to serve
    requests: list[str] = field(default_factory=list)


def image(layer: bytes, layer_media_type: str = TAR_LAYER, config: bytes = CONFIG) -> tuple[bytes, bytes, bytes]:
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": layer_media_type, "digest": sha256(layer), "size": len(layer)}]}).encode()
    return manifest, config, layer


def index_of(*manifests: tuple[bytes, dict | None]) -> bytes:
    """An image index over (manifest or index bytes, platform) pairs."""
    entries = []
    for data, platform in manifests:
        entry = {"mediaType": json.loads(data).get("mediaType", OCI_MANIFEST), "digest": sha256(data),
                 "size": len(data)}
        if platform is not None:
            entry["platform"] = platform
        entries.append(entry)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def make_app(layer: bytes, faults: Faults) -> web.Application:
    manifest, config, _ = image(layer, faults.layer_media_type, faults.config)
    blobs = {**faults.blobs, sha256(config): config, sha256(layer): layer}

    def authorized(request: web.Request) -> bool:
        if not faults.require_password:
            return True
        import base64
        expected = "Basic " + base64.b64encode(faults.require_password.encode()).decode()
        return request.headers.get("Authorization") == expected

    def challenge() -> web.Response:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                 headers={"WWW-Authenticate": 'Basic realm="faulty"'})

    async def version(request):
        faults.requests.append("GET /v2/")
        return web.json_response({}) if authorized(request) else challenge()

    async def get_manifest(request):
        ref = request.match_info["ref"]
        faults.requests.append(f"GET manifest {ref}")
        if not authorized(request):
            return challenge()
        if faults.unavailable_once:
            faults.unavailable_once = False
            return web.json_response({"errors": [{"code": "UNAVAILABLE"}]}, status=503)
        if ref in faults.manifests:
            body = faults.manifests[ref]
            media_type = OCI_INDEX if b'"manifests"' in body[:1 << 20] else OCI_MANIFEST
            return web.Response(body=body, content_type=media_type)
        headers = {"Docker-Content-Digest": sha256(manifest)}
        if faults.rate_limit_headers:
            headers.update({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"})
        return web.Response(body=manifest, content_type=OCI_MANIFEST, headers=headers)

    async def list_tags(request):
        faults.requests.append("GET tags")
        return web.json_response({"name": request.match_info["name"], "tags": faults.tags})

    async def get_blob(request):
        digest = request.match_info["digest"]
        faults.requests.append(f"GET blob {digest[:15]} range={request.headers.get('Range')}")
        if not authorized(request):
            return challenge()
        if faults.rate_limit_always or faults.rate_limit_once:
            faults.rate_limit_once = False
            return web.json_response({"errors": [{"code": "TOOMANYREQUESTS"}]}, status=429,
                                     headers={"Retry-After": "0", "ratelimit-limit": "100;w=21600"})
        if faults.redirect_blobs_to:
            raise web.HTTPTemporaryRedirect(f"{faults.redirect_blobs_to}/cdn/{digest}")
        if digest not in blobs or (faults.missing_layer and blobs[digest] == layer):
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        body = blobs[digest]
        if body == layer:
            if faults.corrupt_layer:
                body = bytes(reversed(body))
            if faults.oversize_layer:
                body = body + b"extra bytes"
        start = 0
        if request.headers.get("Range", "").startswith("bytes=") and not faults.ignore_range:
            start = int(request.headers["Range"][6:].split("-")[0])
        status = 206 if start else 200
        response = web.StreamResponse(status=status)
        response.content_length = len(body) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        await response.prepare(request)
        if body == layer and faults.stall_after is not None and not faults.released.is_set():
            await response.write(body[start:start + faults.stall_after])
            faults.layer_bytes_sent += min(faults.stall_after, len(body) - start)
            await faults.released.wait()  # unless the client gives up (or is killed) first
            if request.transport is not None:
                request.transport.close()  # then the connection breaks off mid-body
            return response
        if body == layer and faults.drop_after is not None and start == 0:
            cut = faults.drop_after
            faults.drop_after = None
            await response.write(body[:cut])
            request.transport.close()  # the connection dies mid-body
            return response
        await response.write(body[start:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v2/", version)
    app.router.add_get("/v2/{name:.+}/manifests/{ref}", get_manifest)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", get_blob)
    app.router.add_get("/v2/{name:.+}/tags/list", list_tags)
    return app


def make_cdn(layer: bytes, seen_headers: list[dict]) -> web.Application:
    """Another host serving blobs by digest; it records the headers it was sent."""
    _, config, _ = image(layer)
    blobs = {sha256(config): config, sha256(layer): layer}

    async def get(request):
        seen_headers.append(dict(request.headers))
        return web.Response(body=blobs[request.match_info["digest"]])

    app = web.Application()
    app.router.add_get("/cdn/{digest}", get)
    return app
