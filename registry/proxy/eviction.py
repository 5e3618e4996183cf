"""Keeping a proxy's cache under its `max_bytes`: the least recently pulled images go first.

An image here is a manifest of a cached repository that no other manifest of it lists (a
tag's index, or a manifest pulled by digest), with the manifests it lists. Evicting one
removes its tags and manifests from the cached repository; the garbage collection that runs
right after (storage/gc.py) deletes the blobs nothing references any more, so content a
private repository (or another cached image) still references is never deleted. The most
recently pulled image always stays, even alone above the cap."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field

from ocispec.digest import Digest, InvalidDigest
from storage import ManifestNotFound, StorageDriver
from storage.gc import references_of
from storage.manifests import READ_LIMIT, remove_manifest

from .config import Proxy
from .manifests import is_private, pulled_record_key, tag_record_key
from .routing import Router

log = logging.getLogger("kura.proxy")


@dataclass
class _Image:
    repository: str
    root: str
    manifests: set[str]
    blobs: set[str]
    last_pulled: float
    tags: list[str] = field(default_factory=list)


@dataclass
class Eviction:
    proxy: Proxy
    size_before: int
    size_after: int
    evicted: list[tuple[str, str]]  # (repository, root manifest digest)
    content: dict[str, set[str]]
    """Repository -> the digests (manifests, blobs) of the images evicted there."""


async def cache_size(driver: StorageDriver, router: Router, proxy: Proxy) -> tuple[int, list[_Image], dict[str, int]]:
    """Bytes the proxy's cached repositories hold (each blob and manifest once), their images,
    and the size of every digest counted."""
    images: list[_Image] = []
    sizes: dict[str, int] = {}
    for name in await driver.list_repositories():
        route = router.route(name)
        if route is None or route.proxy is not proxy or route.local_name != name or await is_private(driver, name):
            continue  # not this proxy's, or a private repository under its name
        images += await _images(driver, name, sizes)
    return sum(sizes.values()), images, sizes


async def evict(driver: StorageDriver, router: Router) -> list[Eviction]:
    """Remove the least recently pulled images of every proxy above its cap (the caller then
    collects garbage)."""
    done = []
    for proxy in router.proxies:
        if proxy.max_bytes:
            eviction = await _evict_proxy(driver, router, proxy)
            if eviction is not None:
                done.append(eviction)
    return done


async def _evict_proxy(driver: StorageDriver, router: Router, proxy: Proxy) -> Eviction | None:
    total, images, sizes = await cache_size(driver, router, proxy)
    if total <= proxy.max_bytes or len(images) < 2:
        return None
    holders: dict[str, int] = {}
    for image in images:
        for digest in image.manifests | image.blobs:
            holders[digest] = holders.get(digest, 0) + 1
    images.sort(key=lambda image: image.last_pulled)
    remaining, doomed = total, []
    for image in images[:-1]:  # the most recently pulled stays
        if remaining <= proxy.max_bytes:
            break
        doomed.append(image)
        for digest in image.manifests | image.blobs:
            holders[digest] -= 1
            if holders[digest] == 0:
                remaining -= sizes.get(digest, 0)
    kept_by_repository: dict[str, set[str]] = {}
    for image in images:
        if image not in doomed:
            kept_by_repository.setdefault(image.repository, set()).update(image.manifests)
    for image in doomed:
        await _remove(driver, image, kept_by_repository.get(image.repository, set()))
        log.info("proxy %s: evicted %s@%s (last pulled %s), over max_bytes %d", proxy.label, image.repository,
                 image.root, image.last_pulled, proxy.max_bytes)
    content: dict[str, set[str]] = {}
    for image in doomed:
        content.setdefault(image.repository, set()).update(image.manifests | image.blobs)
    return Eviction(proxy, total, remaining, [(image.repository, image.root) for image in doomed], content)


async def _remove(driver: StorageDriver, image: _Image, kept: set[str]) -> None:
    async with driver.repository_lock(image.repository):
        for digest in sorted(image.manifests - kept):
            parsed = Digest.parse(digest)
            with contextlib.suppress(ManifestNotFound):
                await remove_manifest(driver, image.repository, parsed, READ_LIMIT)
            await driver.delete_cache_record(image.repository, pulled_record_key(parsed))
        for tag in image.tags:
            await driver.delete_cache_record(image.repository, tag_record_key(tag))


async def _images(driver: StorageDriver, repository: str, sizes: dict[str, int]) -> list[_Image]:
    snapshot = await driver.snapshot_repository(repository)
    pulled = _pulled_times(await driver.list_cache_records(repository))
    refs = {}
    for digest in snapshot.revisions:
        with contextlib.suppress(Exception):
            data = await driver.read_small_blob(digest, READ_LIMIT)
            refs[str(digest)] = references_of(data)
            sizes[str(digest)] = len(data)
    listed = {child for ref in refs.values() for child in ref.children}
    images = []
    for root in refs:
        if root in listed:
            continue
        manifests, blobs, stack = set(), set(), [root]
        while stack:
            digest = stack.pop()
            if digest in manifests or digest not in refs:
                continue
            manifests.add(digest)
            blobs.update(refs[digest].blobs)
            stack += refs[digest].children
        for blob in blobs:
            if blob not in sizes:
                with contextlib.suppress(InvalidDigest):
                    stored = await driver.stat_blob(Digest.parse(blob))
                    if stored is not None:
                        sizes[blob] = stored.size
        times = [pulled[digest] for digest in manifests if digest in pulled]
        last = max(times) if times else snapshot.revisions.get(Digest.parse(root), 0.0)
        tags = [tag for tag, stamp in snapshot.tags.items() if str(stamp.digest) in manifests]
        images.append(_Image(repository, root, manifests, {b for b in blobs if b in sizes}, last, tags))
    return images


def _pulled_times(records: dict[str, bytes]) -> dict[str, float]:
    times = {}
    for key, data in records.items():
        if not key.startswith("pulled-"):
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            document = json.loads(data)
            times[document["digest"]] = float(document["at"])
    return times
