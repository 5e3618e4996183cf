"""Registry look-ups for `kura inspect`, `kura tags` and `kura delete`."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from urllib.parse import urljoin

import aiohttp

from ocispec.digest import Digest
from ocispec.reference import Reference

from .limits import CONFIG_LIMIT
from .platform import Platform
from .pull import fetch_manifest
from .registries import Registries
from .transport import RegistryClient, RegistryError, read_limited

TAGS_PAGE_LIMIT = 4 << 20


@asynccontextmanager
async def connect(reference: Reference, registries: Registries, credentials):
    endpoint = registries.endpoints(reference)[-1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield RegistryClient(session, endpoint, credentials(endpoint.host))


async def inspect(reference: Reference, registries: Registries, credentials) -> dict:
    async with connect(reference, registries, credentials) as client:
        manifest = await fetch_manifest(client, reference.reference, reference.digest)
        document = manifest.document
        config = None
        if "config" in document:
            scope = f"repository:{client.endpoint.repository}:pull"
            digest = Digest.parse(document["config"]["digest"])
            async with client.request("GET", client.repo_path(f"blobs/{digest}"), scope=scope) as r:
                data = await read_limited(r, CONFIG_LIMIT, "image config")
            if Digest.of_bytes(data, digest.algorithm) != digest:
                raise RegistryError(f"config blob does not match {digest}")
            try:
                config = json.loads(data)
            except (ValueError, RecursionError):
                raise RegistryError(f"image config {digest} is not JSON") from None
            if not isinstance(config, dict):
                raise RegistryError(f"image config {digest} is not a JSON object")
    return describe(str(reference), manifest.digest, manifest.media_type, manifest.data, document, config)


def describe(name: str, digest: Digest, media_type: str, raw: bytes, document: dict, config: dict | None) -> dict:
    out = {"reference": name, "digest": str(digest), "mediaType": media_type, "raw": raw.decode(errors="replace")}
    if "manifests" in document:
        out["platforms"] = [str(Platform.of(m) or "unknown") for m in document["manifests"]]
        return out
    out["layers"] = [{"digest": layer["digest"], "size": layer["size"], "mediaType": layer["mediaType"]}
                     for layer in document.get("layers", [])]
    if config is not None:
        out["config"] = config
        runtime = config.get("config") if isinstance(config.get("config"), dict) else {}
        out.update({"created": config.get("created"), "platform": f"{config.get('os')}/{config.get('architecture')}",
                    "entrypoint": runtime.get("Entrypoint"), "cmd": runtime.get("Cmd")})
    return out


async def list_tags(reference: Reference, registries: Registries, credentials) -> list[str]:
    tags: list[str] = []
    async with connect(reference, registries, credentials) as client:
        scope = f"repository:{client.endpoint.repository}:pull"
        path = client.repo_path("tags/list?n=1000")
        seen: set[str] = set()
        while path:
            if path in seen or len(seen) >= 10_000:
                raise RegistryError(f"{reference.name}: the tag list's Link pages go round in circles")
            seen.add(path)
            async with client.request("GET", path, scope=scope) as r:
                if r.status == 404:
                    raise RegistryError(f"no repository {reference.name}")
                page = _tags_of(await read_limited(r, TAGS_PAGE_LIMIT, "tag list"))
                link = r.headers.get("Link", "")
            tags += page
            path = urljoin(path, _next_page(link)) if 'rel="next"' in link else None
    return tags


def _tags_of(data: bytes) -> list[str]:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise RegistryError("the tag list is not JSON") from None
    tags = body.get("tags") if isinstance(body, dict) else None
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise RegistryError("the tag list's tags are not a list of strings")
    return tags or []


def _next_page(link: str) -> str:
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        raise RegistryError("the tag list's Link header names no next page")
    return link[start + 1:end]


async def delete(reference: Reference, registries: Registries, credentials) -> None:
    async with connect(reference, registries, credentials) as client:
        scope = f"repository:{client.endpoint.repository}:delete"
        async with client.request("DELETE", client.repo_path(f"manifests/{reference.reference}"), scope=scope,
                                  ok=(202, 200)) as r:
            if r.status == 404:
                raise RegistryError(f"{reference} not found")
