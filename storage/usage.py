"""Usage accounting: what each repository and each quota namespace stores.

A repository holds the blobs linked into it (layers, configs: its layer links) and its
manifests (revision links). A quota namespace, the repositories whose names match the
quota's globs, stores every blob one of them holds, each counted once however many of
them hold it. Its count lives in a usage ledger of the driver (updated under a lock on every
push, see registry/quota.py) and is made exact again by `recount`: at start-up, by
`kura du` and `kura repo delete`, and at the end of a garbage collection, which is when
deleted content stops counting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field

from ocispec.digest import Digest, InvalidDigest
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest

from .driver import ManifestLink, StorageDriver
from .errors import BlobNotFound, TooLarge
from .manifests import READ_LIMIT

# Repositories walked between two yields to the event loop (a recount runs in the server).
REPOSITORIES_PER_YIELD = 16


@dataclass(frozen=True)
class Quota:
    repositories: tuple[str, ...]
    """Globs, as in the access rules (registry/auth/rules.py); `patterns` are their regexes."""
    max_bytes: int
    patterns: tuple[re.Pattern, ...] = field(compare=False, repr=False)

    def matches(self, repository: str) -> bool:
        return any(pattern.fullmatch(repository) for pattern in self.patterns)

    @property
    def ledger(self) -> str:
        """The key of the namespace's usage ledger: quotas with the same globs share one."""
        return hashlib.sha256("\n".join(sorted(set(self.repositories))).encode()).hexdigest()

    @property
    def label(self) -> str:
        return ", ".join(self.repositories)


async def held_blobs(driver: StorageDriver, repository: str,
                     manifests: list[ManifestLink] | None = None) -> set[Digest]:
    """The blobs a repository holds: its layer links and its manifests (`manifests`, when
    the caller has listed them already)."""
    if manifests is None:
        manifests = await driver.list_manifests(repository)
    return {link.digest for link in await driver.list_blob_links(repository)} | {link.digest for link in manifests}


async def _sizes(driver: StorageDriver, digests, sizes: dict[Digest, int]) -> None:
    """Fill in `sizes` for `digests` (a blob missing from the store counts nothing)."""
    for digest in digests:
        if digest not in sizes:
            blob = await driver.stat_blob(digest)
            sizes[digest] = blob.size if blob is not None else 0


async def recount(driver: StorageDriver, quotas) -> dict[str, int]:
    """Count exactly what each quota's namespace stores and store it in its ledger (safe
    while pushes go on, in this process or others). Returns ledger key -> bytes."""
    namespaces: dict[str, Quota] = {quota.ledger: quota for quota in quotas}  # same globs, same ledger
    if not namespaces:
        return {}
    checkpoints = {key: await driver.usage_ledger(key).checkpoint() for key in namespaces}
    counted: dict[str, set[Digest]] = {key: set() for key in namespaces}
    sizes: dict[Digest, int] = {}
    for number, repository in enumerate(await driver.list_repositories(), 1):
        keys = [key for key, quota in namespaces.items() if quota.matches(repository)]
        if keys:
            held = await held_blobs(driver, repository)
            for key in keys:
                counted[key] |= held
        if number % REPOSITORIES_PER_YIELD == 0:
            await asyncio.sleep(0)
    totals = {}
    for key, digests in counted.items():
        await _sizes(driver, digests, sizes)
        totals[key] = await driver.usage_ledger(key).replace({d: sizes[d] for d in digests}, checkpoints[key])
    return totals


async def used_bytes(driver: StorageDriver, quota: Quota) -> int | None:
    """What the quota's ledger counts now (None before its first count)."""
    return await driver.usage_ledger(quota.ledger).total()


# -- kura du ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RepositoryUsage:
    name: str
    manifests: int
    tags: int
    referenced_bytes: int
    """Size of the distinct blobs the repository holds (layer links and manifests)."""
    exclusive_bytes: int
    """Of those, the blobs no other repository holds: what deleting it would free."""


@dataclass(frozen=True)
class StoreUsage:
    repositories: list[RepositoryUsage]
    blobs: int
    store_bytes: int
    reclaimable_blobs: int
    reclaimable_bytes: int
    """Blobs that no manifest revision of any repository references (nor is one)."""


async def measure(driver: StorageDriver) -> StoreUsage:
    held: dict[str, set[Digest]] = {}
    counts: dict[str, tuple[int, int]] = {}
    holders: dict[Digest, int] = {}
    manifests: dict[Digest, str] = {}
    for number, repository in enumerate(await driver.list_repositories(), 1):
        links = await driver.list_manifests(repository)
        held[repository] = await held_blobs(driver, repository, links)
        counts[repository] = (len(links), len(await driver.list_tags(repository)))
        for digest in held[repository]:
            holders[digest] = holders.get(digest, 0) + 1
        for link in links:
            manifests.setdefault(link.digest, link.media_type)
        if number % REPOSITORIES_PER_YIELD == 0:
            await asyncio.sleep(0)

    stored: dict[Digest, int] = {}
    async for blob in driver.iter_blobs():
        stored[blob.digest] = blob.size
    sizes = dict(stored)
    await _sizes(driver, holders, sizes)  # a held blob missing from the store counts nothing
    referenced = await referenced_by_manifests(driver, manifests)
    unreferenced = [digest for digest in stored if digest not in referenced]
    rows = [RepositoryUsage(name, *counts[name], sum(sizes[d] for d in digests),
                            sum(sizes[d] for d in digests if holders[d] == 1))
            for name, digests in held.items()]
    return StoreUsage(rows, len(stored), sum(stored.values()), len(unreferenced),
                      sum(stored[d] for d in unreferenced))


async def referenced_by_manifests(driver: StorageDriver, manifests: dict[Digest, str]) -> set[Digest]:
    """The manifests given (digest -> media type) and every blob, child manifest and
    subject they name. A manifest that no longer parses keeps every digest it mentions."""
    referenced = set(manifests)
    for number, (digest, media_type) in enumerate(manifests.items(), 1):
        try:
            data = await driver.read_small_blob(digest, READ_LIMIT)
        except (BlobNotFound, TooLarge):
            continue
        referenced |= _references(data, media_type)
        if number % REPOSITORIES_PER_YIELD == 0:
            await asyncio.sleep(0)
    return referenced


def _references(data: bytes, media_type: str) -> set[Digest]:
    try:
        manifest = parse_manifest(data, media_type)
    except (ManifestInvalid, ManifestUnsupported):
        return _mentioned_digests(data)
    found = {d.digest for d in manifest.blobs} | {d.digest for d in manifest.children}
    if manifest.subject is not None:
        found.add(manifest.subject.digest)
    return found


def _mentioned_digests(data: bytes) -> set[Digest]:
    found: set[Digest] = set()
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return found
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if isinstance(value.get("digest"), str):
                try:
                    found.add(Digest.parse(value["digest"]))
                except InvalidDigest:
                    pass
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return found
