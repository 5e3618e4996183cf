"""Verify a store through the StorageDriver interface, so it runs unchanged on any driver:
re-hash every blob, check every repository's blob links, manifest links (and re-validate
each manifest with the push-time rules), tags, referrer entries and the upload sessions.
What only the driver can see of its own storage (stray entries, temp files) comes from
StorageDriver.check_layout.

It changes nothing, and may run while the store is served: an entry that disappears
between being listed and being read (a collection, a delete) is skipped, not reported.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ocispec.digest import Digest, new_hasher
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest

from .driver import StorageDriver
from .errors import BlobNotFound, StorageError, TooLarge, UploadNotFound
from .manifests import READ_LIMIT

CACHE_ORIGIN_RECORD = "origin"  # in a repository a pull-through cache fills (registry/proxy/)
# What a driver may raise for an entry whose stored record is damaged (torn, not JSON, not
# the shape it writes): reported as unreadable. Anything else (the store being unreachable)
# ends the check.
DAMAGED = (StorageError, ValueError, KeyError, TypeError, AttributeError, RecursionError)
# Blobs, or entries of one repository, checked between two yields to the event loop.
ENTRIES_PER_YIELD = 64


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blobs: int = 0
    repositories: int = 0
    manifests: int = 0
    tags: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def fsck(driver: StorageDriver) -> Report:
    report = Report()
    problems, notes = await driver.check_layout()
    report.problems += problems
    await _check_blobs(driver, report)
    for name in await driver.list_repositories():
        report.repositories += 1
        await _check_repository(driver, name, report)
    await _check_uploads(driver, report)
    report.notes += notes
    return report


async def _check_blobs(driver: StorageDriver, report: Report) -> None:
    blobs = sorted([blob async for blob in driver.iter_blobs()], key=lambda blob: blob.digest)
    for blob in blobs:
        try:
            actual, size = await _hash(driver, blob.digest)
        except BlobNotFound:
            continue  # deleted since it was listed
        report.blobs += 1
        if actual != blob.digest.encoded:
            report.problems.append(f"blob {blob.digest} is corrupt: content hashes to {actual}")
        elif size != blob.size:
            report.problems.append(f"blob {blob.digest} is listed with {blob.size} bytes but holds {size}")


async def _hash(driver: StorageDriver, digest: Digest) -> tuple[str, int]:
    hasher = new_hasher(digest.algorithm)
    size = 0
    async for chunk in driver.read_blob(digest):
        if len(chunk) >= 1 << 16:
            await asyncio.to_thread(hasher.update, chunk)  # hashlib lets go of the GIL: reads go on
        else:
            hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


async def _check_repository(driver: StorageDriver, name: str, report: Report) -> None:
    snapshot = await driver.snapshot_repository(name)
    linked_blobs = set()
    for count, digest in enumerate(sorted(snapshot.layers), 1):
        if await driver.stat_blob(digest) is None:
            report.problems.append(f"{name}: layer link {digest} points at a missing blob")
        else:
            linked_blobs.add(digest)
        await _pace(count)

    manifests = {}
    present: set[Digest] = set()
    for count, digest in enumerate(sorted(snapshot.revisions), 1):
        await _pace(count)
        try:
            link = await driver.get_manifest_link(name, digest)
        except DAMAGED:
            link = None
            damaged = True
        else:
            damaged = link is not None and not isinstance(link.media_type, str)
        if damaged:
            report.manifests += 1
            report.problems.append(f"{name}: manifest link {digest} is unreadable")
            continue
        if link is None:
            continue  # unlinked since the snapshot
        report.manifests += 1
        try:
            data = await driver.read_small_blob(digest, READ_LIMIT)
        except BlobNotFound:
            report.problems.append(f"{name}: manifest {digest} is missing from the blob store")
            continue
        except TooLarge:
            present.add(digest)
            report.problems.append(f"{name}: manifest {digest} does not parse: larger than {READ_LIMIT} bytes")
            continue
        present.add(digest)  # reported below if it does not parse, but it is there
        try:
            manifests[digest] = await asyncio.to_thread(parse_manifest, data, link.media_type)
        except (ManifestInvalid, ManifestUnsupported) as exc:
            report.problems.append(f"{name}: manifest {digest} does not parse: {exc}")

    # A pull-through cache stores a manifest first and its blobs when they are pulled.
    cached = await driver.read_cache_record(name, CACHE_ORIGIN_RECORD) is not None
    stored: dict[Digest, bool] = {}
    for count, (digest, manifest) in enumerate(manifests.items(), 1):
        for descriptor in manifest.blobs:
            if descriptor.urls:
                continue
            if descriptor.digest not in stored:
                stored[descriptor.digest] = await driver.stat_blob(descriptor.digest) is not None
            if not stored[descriptor.digest]:
                if cached:
                    continue
                report.problems.append(f"{name}: manifest {digest} references missing blob {descriptor.digest}")
            elif descriptor.digest not in linked_blobs:
                report.notes.append(f"{name}: manifest {digest} references blob {descriptor.digest}, "
                                    "which was deleted from the repository")
        for child in manifest.children:
            if child.digest not in present and not cached:
                report.notes.append(f"{name}: index {digest} references manifest {child.digest}, "
                                    "which was deleted from the repository")
        await _pace(count)

    for count, tag in enumerate(await driver.list_tags(name), 1):
        await _pace(count)
        try:
            target = await driver.resolve_tag(name, tag)
        except DAMAGED:
            report.tags += 1
            report.problems.append(f"{name}: tag {tag} is unreadable")
            continue
        if target is None:
            continue  # deleted since it was listed
        report.tags += 1
        if target not in present:
            report.problems.append(f"{name}: tag {tag} points at missing manifest {target}")

    for subject in await driver.list_referrer_subjects(name):
        for count, referrer in enumerate(await driver.list_referrers(name, subject), 1):
            await _pace(count)
            if referrer not in present:
                report.problems.append(f"{name}: referrer entry {referrer} names a missing manifest")
                continue
            try:
                descriptor = await driver.read_referrer(name, subject, referrer)
                readable = descriptor is None or Digest.parse(descriptor["digest"]) == referrer
            except DAMAGED:
                readable = False
            if not readable:
                report.problems.append(f"{name}: referrer entry {referrer} of {subject} is unreadable")


async def _check_uploads(driver: StorageDriver, report: Report) -> None:
    sessions = 0
    for uuid in await driver.list_uploads():
        try:
            await driver.get_upload(uuid)
        except UploadNotFound:
            continue  # being created or removed
        except DAMAGED:
            report.problems.append(f"upload session {uuid} is unreadable")
            continue
        sessions += 1
    if sessions:
        report.notes.append(f"{sessions} upload session(s) in progress or abandoned")


async def _pace(count: int) -> None:
    if count % ENTRIES_PER_YIELD == 0:
        await asyncio.sleep(0)

