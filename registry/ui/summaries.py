"""What the web UI shows of a manifest and of an image's config, read through the storage
driver and cached by digest (content never changes under its digest), so that a page of 100
tags parses nothing it has parsed before.

Everything read here may be hostile (labels, history, annotations are whatever the pusher
wrote): values are only extracted with their types checked, and the templates escape them."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass, field

from ocispec import mediatypes as mt
from ocispec.digest import Digest
from ocispec.manifest import Descriptor, Manifest, ManifestInvalid, ManifestUnsupported, parse_manifest
from storage import BlobNotFound, StorageDriver, TooLarge
from storage.manifests import READ_LIMIT

CONFIG_READ_LIMIT = 8 << 20
IMAGE_CONFIGS = frozenset({mt.OCI_CONFIG, mt.DOCKER_CONFIG})
CACHE_ENTRIES = 20_000
# Reads of one page's summaries at a time (an S3 request each when nothing is cached).
PARALLEL_READS = 16


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config (OCI image-spec `config.json`) the UI shows."""
    os: str = ""
    architecture: str = ""
    variant: str = ""
    created: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    history: tuple[dict, ...] = ()
    readable: bool = True

    @property
    def platform(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


@dataclass(frozen=True)
class Summary:
    """One manifest as a row of the tags page shows it."""
    kind: str  # image, index or artifact
    media_type: str
    size: int
    """Bytes it pulls: config and layers (an index: every child's), plus the manifests."""
    platforms: tuple[str, ...] = ()
    artifact_type: str | None = None
    children: tuple[Descriptor, ...] = field(default=(), compare=False)
    manifest: Manifest | None = field(default=None, compare=False, repr=False)
    config: ImageConfig | None = field(default=None, compare=False, repr=False)


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def parse_config(data: bytes) -> ImageConfig:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return ImageConfig(readable=False)
    if not isinstance(doc, dict):
        return ImageConfig(readable=False)
    run = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    labels = run.get("Labels") if isinstance(run.get("Labels"), dict) else {}
    history = []
    for entry in doc.get("history") if isinstance(doc.get("history"), list) else []:
        if isinstance(entry, dict):
            history.append({"created": _text(entry.get("created")), "created_by": _text(entry.get("created_by")),
                            "comment": _text(entry.get("comment")), "empty_layer": entry.get("empty_layer") is True})
    return ImageConfig(
        os=_text(doc.get("os")), architecture=_text(doc.get("architecture")), variant=_text(doc.get("variant")),
        created=_text(doc.get("created")), entrypoint=_strings(run.get("Entrypoint")), cmd=_strings(run.get("Cmd")),
        env=_strings(run.get("Env")) or (), working_dir=_text(run.get("WorkingDir")), user=_text(run.get("User")),
        exposed_ports=tuple(sorted(k for k in run.get("ExposedPorts") or {} if isinstance(k, str)))
        if isinstance(run.get("ExposedPorts"), dict) else (),
        volumes=tuple(sorted(k for k in run.get("Volumes") or {} if isinstance(k, str)))
        if isinstance(run.get("Volumes"), dict) else (),
        labels=tuple(sorted((k, v) for k, v in labels.items() if isinstance(k, str) and isinstance(v, str))),
        history=tuple(history))


def platform_text(platform: dict | None) -> str:
    if not platform:
        return ""
    parts = [platform.get(key) for key in ("os", "architecture", "variant")]
    return "/".join(part for part in parts if isinstance(part, str) and part)


class Summaries:
    """Summaries and configs by digest, least recently used dropped beyond CACHE_ENTRIES."""

    def __init__(self, driver: StorageDriver, entries: int = CACHE_ENTRIES):
        self.driver = driver
        self.entries = entries
        self._cache: OrderedDict[Digest, Summary] = OrderedDict()
        self._reads = asyncio.Semaphore(PARALLEL_READS)

    def _remember(self, digest: Digest, summary: Summary) -> Summary:
        self._cache[digest] = summary
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)
        return summary

    async def many(self, digests: list[Digest]) -> dict[Digest, Summary | None]:
        found: dict[Digest, Summary | None] = {}
        missing = []
        for digest in dict.fromkeys(digests):
            cached = self._cache.get(digest)
            if cached is None:
                missing.append(digest)
            else:
                self._cache.move_to_end(digest)
                found[digest] = cached
        if missing:  # a task each only for what must be read
            found.update(zip(missing, await asyncio.gather(*(self.get(digest) for digest in missing))))
        return found

    async def get(self, digest: Digest, media_type: str | None = None, depth: int = 0) -> Summary | None:
        """The summary of the manifest stored under `digest` (None when it is not stored or
        not a manifest Kura can read)."""
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache.move_to_end(digest)
            return cached
        async with self._reads:
            try:
                data = await self.driver.read_small_blob(digest, READ_LIMIT)
            except (BlobNotFound, TooLarge):
                return None
        try:
            manifest = parse_manifest(data, media_type)
        except (ManifestInvalid, ManifestUnsupported):
            return None
        if manifest.is_index:
            summary = await self._index(manifest, len(data), depth)
        else:
            summary = await self._image(manifest, len(data))
        return self._remember(digest, summary)

    async def _index(self, manifest: Manifest, own_size: int, depth: int) -> Summary:
        size = own_size
        platforms = []
        if depth < 2:  # an index of indexes is rare; deeper nesting is not followed
            children = await asyncio.gather(*(self.get(child.digest, child.media_type, depth + 1)
                                              for child in manifest.children))
        else:
            children = [None] * len(manifest.children)
        for child, summary in zip(manifest.children, children):
            size += summary.size if summary is not None else child.size
            text = platform_text(child.platform)
            if text and text != "unknown/unknown":  # buildkit's attestation manifests
                platforms.append(text)
        return Summary("index", manifest.media_type, size, tuple(dict.fromkeys(platforms)),
                       manifest.artifact_type, manifest.children, manifest)

    async def _image(self, manifest: Manifest, own_size: int) -> Summary:
        config_descriptor = manifest.blobs[0]
        size = own_size + sum(blob.size for blob in manifest.blobs)
        is_image = config_descriptor.media_type in IMAGE_CONFIGS and not manifest.artifact_type
        config = await self.config(config_descriptor.digest) if is_image else None
        platforms = (config.platform,) if config is not None and config.platform else ()
        artifact_type = manifest.artifact_type or (None if is_image else config_descriptor.media_type)
        return Summary("image" if is_image else "artifact", manifest.media_type, size, platforms,
                       artifact_type, (), manifest, config)

    async def config(self, digest: Digest) -> ImageConfig:
        async with self._reads:
            try:
                data = await self.driver.read_small_blob(digest, CONFIG_READ_LIMIT)
            except (BlobNotFound, TooLarge):
                return ImageConfig(readable=False)
        if len(data) > 64 << 10:
            return await asyncio.to_thread(parse_config, data)
        return parse_config(data)
