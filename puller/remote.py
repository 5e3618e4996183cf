"""Registry look-ups for `kura inspect`, `kura tags` and `kura delete`."""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager
from typing import NamedTuple
from urllib.parse import urljoin

from ocispec import mediatypes as mt
from ocispec.digest import Digest, InvalidDigest
from ocispec.reference import Reference

from .aiohttp_loader import aiohttp
from .limits import CONFIG_LIMIT
from .platform import Platform, fits
from .pull import _NestedIndexes, fetch_manifest
from .registries import Registries
from .transport import RegistryClient, RegistryError, _error_text, printable, read_limited

TAGS_PAGE_LIMIT = 4 << 20


@asynccontextmanager
async def connect(reference: Reference, registries: Registries, credentials):
    endpoint = registries.endpoints(reference)[-1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield RegistryClient(session, endpoint, credentials(endpoint.host))


async def inspect(reference: Reference, registries: Registries, credentials, platform: Platform | None = None
                  ) -> dict:
    """What the registry holds for `reference` now; with `platform`, an index's image for it."""
    async with connect(reference, registries, credentials) as client:
        top = await fetch_manifest(client, reference.reference, reference.digest)
        manifest = top
        if platform is not None and top.is_index:
            nested = _NestedIndexes(client)
            found = await nested.pick(top, platform)
            if found is None:
                raise RegistryError(f"no image for platform {platform} in {reference}; available: "
                                    f"{', '.join(sorted(nested.platforms)) or 'none'}")
            manifest = found[0]
        config = await _fetch_config(client, manifest.document) if "config" in manifest.document else None
    info = describe(str(reference), manifest.digest, manifest.media_type, manifest.data, manifest.document, config)
    if manifest is not top:
        info["index"] = str(top.digest)
    check_platform(info, platform)
    return {**info, "source": "registry", "registry": client.endpoint.host}


async def _fetch_config(client: RegistryClient, document: dict) -> dict:
    scope = f"repository:{client.endpoint.repository}:pull"
    digest = Digest.parse(document["config"]["digest"])
    async with client.request("GET", client.repo_path(f"blobs/{digest}"), scope=scope) as r:
        if r.status == 404:
            raise RegistryError(f"image config {digest} not found in {client.endpoint.host}")
        data = await read_limited(r, CONFIG_LIMIT, "image config")
    if Digest.of_bytes(data, digest.algorithm) != digest:
        raise RegistryError(f"config blob does not match {digest}")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise RegistryError(f"image config {digest} is not JSON") from None
    if not isinstance(config, dict):
        raise RegistryError(f"image config {digest} is not a JSON object")
    return config


def describe(name: str, digest: Digest, media_type: str, raw: bytes, document: dict, config: dict | None) -> dict:
    out = {"reference": name, "digest": str(digest), "mediaType": media_type, "raw": raw.decode(errors="replace")}
    if "manifests" in document:
        out["platforms"] = [str(Platform.of(m) or "unknown") for m in document["manifests"]]
        return out
    out["layers"] = [{"digest": layer["digest"], "size": layer["size"], "mediaType": layer["mediaType"]}
                     for layer in document.get("layers", [])]
    if config is not None:
        out["config"] = config
        out.update({"created": config.get("created"), "platform": str(Platform.of_config(config) or "")})
        out.update(_runtime(config.get("config")))
    return out


def _runtime(runtime) -> dict:
    """The config's `config` object, each field in one shape whatever the image sent."""
    if not isinstance(runtime, dict):
        runtime = {}
    env, ports, labels = runtime.get("Env"), runtime.get("ExposedPorts"), runtime.get("Labels")
    return {
        "entrypoint": runtime.get("Entrypoint"),
        "cmd": runtime.get("Cmd"),
        "workingDir": str(runtime["WorkingDir"]) if runtime.get("WorkingDir") else None,
        "env": [str(e) for e in env] if isinstance(env, list) else [str(env)] if env else [],
        "exposedPorts": sorted(str(p) for p in ports) if isinstance(ports, (dict, list)) else [],
        "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
    }


def check_platform(info: dict, wanted: Platform | None) -> None:
    """A single-platform image asked for with --platform must be for that platform."""
    if wanted is None or "platforms" in info or "index" in info or not info.get("platform"):
        return
    try:
        actual = Platform.parse(info["platform"])
    except ValueError:
        actual = None
    if actual is None or not fits(actual, wanted):
        raise RegistryError(f"{info['reference']} is a single-platform image for {printable(info['platform'])}, "
                            f"not {wanted}")


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
            next_page = _next_page(link)
            path = urljoin(path, next_page) if next_page else None
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


_LINK_VALUE = re.compile(r'<([^>]*)>((?:\s*;\s*[^,;]*)*)')


def _next_page(link: str) -> str | None:
    """The target of the `rel="next"` link of a Link header (RFC 8288), None when there is none."""
    for match in _LINK_VALUE.finditer(link):
        params = [p.strip().replace(" ", "") for p in match.group(2).split(";")]
        if 'rel="next"' in params or "rel=next" in params:
            return match.group(1)
    return None


# A registry's error that says it deletes nothing at all (Kura: "deletes are disabled on this
# registry"), as opposed to one that only cannot delete a tag by itself.
_DELETES_DISABLED = re.compile(r"\bdisabled\b|\bdelet\w* (?:are|is) not (?:allowed|enabled|supported)", re.I)


class TagKept(NamedTuple):
    """A tag the registry refused to delete by itself, and the manifest only whose deletion removes it."""
    digest: Digest
    reason: str  # the registry's answer, e.g. "HTTP 400 DIGEST_INVALID: ..."


async def delete_tag(reference: Reference, registries: Registries, credentials) -> TagKept | None:
    """Delete just the tag: None when done. A registry that cannot delete a tag by itself (the
    spec lets it answer 400 or 405) keeps it; then its reason and the digest of the manifest the
    tag points at. A registry whose error says it deletes nothing is a RegistryError."""
    async with connect(reference, registries, credentials) as client:
        scope = f"repository:{client.endpoint.repository}:delete"
        async with client.request("DELETE", client.repo_path(f"manifests/{reference.tag}"), scope=scope,
                                  ok=(200, 202, 400, 405)) as r:
            if r.status == 404:
                raise RegistryError(f"{reference} not found")
            if r.status in (200, 202):
                return None
            reason = f"HTTP {r.status} {await _error_text(r)}".rstrip()
            if _DELETES_DISABLED.search(reason):
                raise RegistryError(f"{reference.domain} refused to delete {reference} ({reason}); nothing deleted")
        return TagKept(await _resolve(client, reference), reason)


async def delete_manifest(reference: Reference, digest: Digest, registries: Registries, credentials) -> None:
    """Delete the manifest `digest` of `reference`'s repository, and with it every tag on it."""
    async with connect(reference, registries, credentials) as client:
        scope = f"repository:{client.endpoint.repository}:delete"
        async with client.request("DELETE", client.repo_path(f"manifests/{digest}"), scope=scope,
                                  ok=(200, 202, 405)) as r:
            if r.status == 404:
                raise RegistryError(f"{reference} not found")
            if r.status == 405:
                reason = f"HTTP 405 {await _error_text(r)}".rstrip()
                raise RegistryError(f"{reference.domain} refused to delete manifest {digest} ({reason}); "
                                    "nothing deleted")


async def _resolve(client: RegistryClient, reference: Reference) -> Digest:
    """The digest of the manifest a tag points at, as the registry stores it."""
    scope = f"repository:{client.endpoint.repository}:pull"
    async with client.request("HEAD", client.repo_path(f"manifests/{reference.tag}"), scope=scope,
                              headers={"Accept": mt.ACCEPT_MANIFESTS}) as r:
        if r.status == 404:
            raise RegistryError(f"{reference} not found")
        claimed = r.headers.get("Docker-Content-Digest", "")
    try:
        return Digest.parse(claimed)
    except InvalidDigest:  # no header: the digest of the body is the manifest's
        return (await fetch_manifest(client, reference.tag, None)).digest
