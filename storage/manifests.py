"""Manifest operations of a repository: the rules that keep links consistent.

Write order on push: manifest bytes -> revision link -> referrer entry -> tag; on delete
the reverse: referrer entry -> tags -> revision link. A crash between any two steps leaves
at worst an unreferenced blob or manifest, never a tag or referrer entry naming a missing
manifest, nor a manifest whose blobs are missing (they are checked before anything is
written). Pushes and deletes of one repository hold its lock, so they never interleave.
A push holds the store's reference guard from its checks to its last write, so a garbage
collection (storage/gc.py) never deletes what it found in between.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, TypeVar

from ocispec import mediatypes as mt
from ocispec.digest import CANONICAL_ALGORITHM, Digest
from ocispec.manifest import Manifest, ManifestInvalid, ManifestUnsupported, parse_manifest, referrer_artifact_type

from .driver import StorageDriver
from .errors import BlobNotFound, DigestMismatch, ManifestNotFound, ManifestReferenceUnknown

T = TypeVar("T")

# Manifests are accepted up to the configured limit (at least 4 MiB); this only caps reads.
READ_LIMIT = 64 << 20
# Reference checks between two yields to the event loop: a 64 MiB manifest names ~500k
# blobs, and a driver whose checks never suspend (the filesystem's) would stall the loop.
CHECKS_PER_YIELD = 64
# Manifests up to this size are parsed and hashed on the event loop (well under a millisecond:
# less than the hop to a worker thread costs); larger ones in a thread.
PARSE_INLINE_BYTES = 64 << 10

FOREIGN_LAYER_TYPES = frozenset({mt.DOCKER_FOREIGN_LAYER, "application/vnd.oci.image.layer.nondistributable.v1.tar",
                                 "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                                 "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"})


@dataclass(frozen=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


async def put_manifest(driver: StorageDriver, repository: str, data: bytes, content_type: str | None,
                       *, digest: Digest | None = None, tags: tuple[str, ...] = ()) -> tuple[Digest, Manifest]:
    """Validate and store a manifest; `digest` when pushed by digest, `tags` to point at it."""
    algorithm = digest.algorithm if digest is not None else CANONICAL_ALGORITHM
    manifest, actual = await _parsed_and_hashed(data, content_type, algorithm)
    if digest is not None and actual != digest:
        raise DigestMismatch(str(digest), str(actual))
    digest = actual
    # From the reference checks to the last link, a garbage collection cannot delete what
    # the checks found; one that is running keeps what is noted here. The checks come after
    # the wait for the lock, so that they see the store as it is when the links are written
    # (a driver whose guard is timed, S3's, looks again for a collection after that wait).
    referrer = None
    if manifest.subject is not None:
        referrer = (manifest.subject.digest, referrer_descriptor(manifest, digest, len(data)))
    early = driver.stores_manifests_before_locking
    async with driver.reference_guard():
        # A driver whose writes are slow next to its checks (the filesystem's fsyncs) stores
        # the content before the lock is taken, and prepares the links there too: pushes to one
        # repository queue for its lock, so what they do under it is kept to the checks and
        # the links themselves. The checks then run first outside it as well, so that a
        # manifest naming what is not here stores nothing (should the second checks fail, the
        # content is left for a collection: it is nobody's until linked).
        if early:
            await _check_blobs(driver, repository, manifest)
            await _check_children(driver, repository, manifest)
            await driver.put_small_blob(data, digest)
        async with driver.staged_manifest_links(repository, digest, manifest.media_type,
                                                referrer, tags) as install_links:
            async with driver.repository_lock(repository):
                await _check_blobs(driver, repository, manifest)
                await driver.note_references(
                    manifests=[digest, *(child.digest for child in manifest.children),
                               *([manifest.subject.digest] if manifest.subject is not None else [])],
                    blobs=[descriptor.digest for descriptor in manifest.blobs])
                # Children are checked under the lock that deletes hold (a client's, or a
                # collection's of untagged manifests), so none goes between check and link.
                await _check_children(driver, repository, manifest)
                if not early:
                    await driver.put_small_blob(data, digest)
                await install_links()
    return digest, manifest


async def put_cached_manifest(driver: StorageDriver, repository: str, data: bytes, media_type: str,
                              digest: Digest, *, tags: tuple[str, ...] = ()) -> Manifest:
    """Store a manifest a pull-through cache verified against `digest`, before the blobs and
    child manifests it references are here: a cache fetches those when they are asked for."""
    manifest, actual = await _parsed_and_hashed(data, media_type, digest.algorithm)
    if actual != digest:
        raise DigestMismatch(str(digest), str(actual))
    async with driver.reference_guard():
        async with driver.repository_lock(repository):
            await driver.note_references(manifests=[digest])
            await driver.put_small_blob(data, digest)
            await driver.link_manifest(repository, digest, manifest.media_type)
            if manifest.subject is not None:
                await driver.add_referrer(repository, manifest.subject.digest,
                                          referrer_descriptor(manifest, digest, len(data)))
            for tag in tags:
                await driver.set_tag(repository, tag, digest)
    return manifest


async def _parsed_and_hashed(data: bytes, content_type: str | None, algorithm: str) -> tuple[Manifest, Digest]:
    if len(data) <= PARSE_INLINE_BYTES:
        return _parse_and_hash(data, content_type, algorithm)
    return await asyncio.to_thread(_parse_and_hash, data, content_type, algorithm)


def _parse_and_hash(data: bytes, content_type: str | None, algorithm: str) -> tuple[Manifest, Digest]:
    return parse_manifest(data, content_type), Digest.of_bytes(data, algorithm)


def referrer_descriptor(manifest: Manifest, digest: Digest, size: int) -> dict:
    descriptor = {"mediaType": manifest.media_type, "digest": str(digest), "size": size}
    artifact_type = referrer_artifact_type(manifest)
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if manifest.annotations:
        descriptor["annotations"] = manifest.annotations
    return descriptor


async def _check_blobs(driver: StorageDriver, repository: str, manifest: Manifest) -> None:
    """Every blob must be in the repository: one check per distinct digest (in first-seen
    order), every size claimed for a blob must be its size."""
    claimed_sizes: dict[Digest, set[int]] = {}
    for descriptor in manifest.blobs:
        if descriptor.media_type in FOREIGN_LAYER_TYPES and descriptor.urls:
            continue  # hosted elsewhere by design
        claimed_sizes.setdefault(descriptor.digest, set()).add(descriptor.size)
    missing_blobs = []
    async for digest, sizes in _paced(claimed_sizes.items()):
        blob = await driver.stat_linked_blob(repository, digest)
        if blob is None:
            missing_blobs.append(str(digest))
        elif sizes != {blob.size}:
            wrong = min(sizes - {blob.size})
            raise ManifestInvalid(f"descriptor of {digest} says {wrong} bytes, the blob has {blob.size}")
    if missing_blobs:
        raise ManifestReferenceUnknown("blob", missing_blobs)


async def _check_children(driver: StorageDriver, repository: str, manifest: Manifest) -> None:
    """Every child manifest must be in the repository (one check per distinct digest)."""
    missing_children = []
    async for child in _paced(dict.fromkeys(child.digest for child in manifest.children)):
        if await driver.get_manifest_link(repository, child) is None:
            missing_children.append(str(child))
    if missing_children:
        raise ManifestReferenceUnknown("manifest", missing_children)


async def _paced(items: Iterable[T]) -> AsyncIterator[T]:
    """`items`, yielding to the event loop every CHECKS_PER_YIELD of them."""
    for count, item in enumerate(items, 1):
        yield item
        if count % CHECKS_PER_YIELD == 0:
            await asyncio.sleep(0)


async def resolve(driver: StorageDriver, repository: str, reference: str | Digest) -> Digest:
    if isinstance(reference, Digest):
        return reference
    digest = await driver.resolve_tag(repository, reference)
    if digest is None:
        raise ManifestNotFound(reference)
    return digest


async def get_manifest(driver: StorageDriver, repository: str, reference: str | Digest,
                       limit: int) -> StoredManifest:
    digest = await resolve(driver, repository, reference)
    link = await driver.get_manifest_link(repository, digest)
    if link is None:
        raise ManifestNotFound(str(digest))
    try:
        data = await driver.read_small_blob(digest, limit)
    except BlobNotFound:
        raise ManifestNotFound(str(digest)) from None
    return StoredManifest(digest, link.media_type, data)


async def delete_manifest(driver: StorageDriver, repository: str, digest: Digest, limit: int) -> list[str]:
    """Remove a manifest from a repository, with the tags and referrer entry that name it;
    returns the tags removed."""
    async with driver.repository_lock(repository):
        return await remove_manifest(driver, repository, digest, limit)


async def remove_manifest(driver: StorageDriver, repository: str, digest: Digest, limit: int) -> list[str]:
    """delete_manifest, for a caller that holds the repository's lock already."""
    stored = await get_manifest(driver, repository, digest, limit)
    subject = await asyncio.to_thread(_subject_of, stored)
    if subject is not None:
        await driver.remove_referrer(repository, subject, digest)
    removed = []
    for tag in await driver.list_tags(repository):
        if await driver.resolve_tag(repository, tag) == digest:
            await driver.delete_tag(repository, tag)
            removed.append(tag)
    await driver.unlink_manifest(repository, digest)
    return removed


def _subject_of(stored: StoredManifest) -> Digest | None:
    """The subject a stored manifest names. One stored before a parsing rule was tightened
    may no longer parse, yet must stay deletable: then `subject` is read leniently."""
    try:
        subject = parse_manifest(stored.data, stored.media_type).subject
        return subject.digest if subject is not None else None
    except (ManifestInvalid, ManifestUnsupported):
        pass
    try:
        return Digest.parse(json.loads(stored.data)["subject"]["digest"])
    except (ValueError, KeyError, TypeError, RecursionError):  # InvalidDigest is a ValueError
        return None


async def delete_tag(driver: StorageDriver, repository: str, tag: str) -> bool:
    async with driver.repository_lock(repository):
        return await driver.delete_tag(repository, tag)


async def referrers(driver: StorageDriver, repository: str, subject: Digest, *, after: Digest | None,
                    artifact_type: str | None, max_entries: int, max_bytes: int) -> tuple[list[dict], Digest | None]:
    """One page of referrer descriptors, and the cursor for the next page (None at the end)."""
    page: list[dict] = []
    size = 0
    for referrer in await driver.list_referrers(repository, subject):
        if after is not None and referrer <= after:
            continue
        if len(page) >= max_entries or size >= max_bytes:
            return page, Digest.parse(page[-1]["digest"])
        descriptor = await driver.read_referrer(repository, subject, referrer)
        if descriptor is None or (artifact_type is not None and descriptor.get("artifactType") != artifact_type):
            continue
        page.append(descriptor)
        size += len(json.dumps(descriptor))
    return page, None
