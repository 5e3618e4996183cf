"""Online garbage collection: delete what no repository can reach any more, while the
registry goes on serving.

Reachable: every manifest linked in any repository (a tag or a digest pull can reach it)
and, transitively, what it references: config, layers, index children, its subject. A
referrer is a linked manifest itself. Unreachable blobs and repository blob links older than
the grace period are deleted, as are expired upload sessions and stale temp files; then
repositories left with nothing disappear from the catalog. Optionally, first: retention
rules remove tags, and manifests no tag reaches (directly, as an index child, as a referrer
of a kept manifest or as the subject of one) are removed.

Pushes in progress are safe (see StorageDriver.reference_guard and docs in layout.py):
  1. the collection starts a journal under the exclusive guard; from then on every manifest
     push, mount and blob commit notes what it references, under the shared guard;
  2. the mark walks the store with no lock held;
  3. each batch of deletes re-reads the journal under the exclusive guard and spares what
     it names. So an operation either finished before the journal started (and the mark
     sees it on disk) or is journaled before the next delete; and none is ever between
     finding content and linking it while a delete runs.
A blob stored or linked again within the grace period is never deleted, so a push whose
manifest has not arrived yet keeps its blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field

from ocispec.digest import Digest, InvalidDigest
from ocispec.names import glob_to_regex

from .driver import Collection, RepositorySnapshot, Stamped, StorageDriver
from .errors import BlobNotFound, ManifestNotFound, TooLarge
from .manifests import READ_LIMIT, remove_manifest

# Temp files are files being written: never judged by a grace period shorter than this.
TEMP_MIN_AGE_SECONDS = 3600
# Deletes per hold of the exclusive guard: pushes wait at most one batch.
BATCH = 500
# Work done between two yields to the event loop, so that requests keep being answered.
TIME_SLICE_SECONDS = 0.005
# Manifests read at once while marking.
READ_AHEAD = 32
DAY = 86400


@dataclass(frozen=True)
class RetentionRule:
    """For the repositories matching `repositories` (globs, as in access rules): remove the
    tags older than `older_than_days` (or, without it, every tag), except the newest
    `keep_last` (by when each was last pushed) and those matching `keep_tags` in full."""
    repositories: tuple[str, ...]
    keep_last: int | None = None
    keep_tags: str | None = None
    older_than_days: float | None = None
    _patterns: tuple[re.Pattern, ...] = field(default=(), compare=False, repr=False)
    _keep: re.Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.keep_last is None and self.older_than_days is None:
            raise ValueError("a retention rule needs keep_last or older_than_days (otherwise it would "
                             "remove every tag it does not keep)")
        object.__setattr__(self, "_patterns", tuple(glob_to_regex(p) for p in self.repositories))
        object.__setattr__(self, "_keep", re.compile(self.keep_tags) if self.keep_tags else None)

    def applies_to(self, repository: str) -> bool:
        return any(pattern.fullmatch(repository) for pattern in self._patterns)

    def tags_to_remove(self, tags: dict[str, Stamped], now: float) -> set[str]:
        newest_first = sorted(tags, key=lambda tag: (tags[tag].mtime, tag), reverse=True)
        kept = set(newest_first[:self.keep_last]) if self.keep_last is not None else set()
        if self._keep is not None:
            kept |= {tag for tag in tags if self._keep.fullmatch(tag)}
        if self.older_than_days is None:
            candidates = set(tags)
        else:
            candidates = {tag for tag, stamp in tags.items() if stamp.mtime < now - self.older_than_days * DAY}
        return candidates - kept


@dataclass(frozen=True)
class GcSettings:
    grace_seconds: int = 3600
    delete_untagged: bool = False
    retention: tuple[RetentionRule, ...] = ()
    upload_expiry_seconds: int = 86400


@dataclass
class GcReport:
    dry_run: bool = False
    skipped: bool = False
    """Another collection was running; this one did nothing."""
    tags: list[tuple[str, str]] = field(default_factory=list)
    manifests: list[tuple[str, Digest]] = field(default_factory=list)
    layer_links: list[tuple[str, Digest]] = field(default_factory=list)
    blobs: list[tuple[Digest, int]] = field(default_factory=list)
    repositories: list[str] = field(default_factory=list)
    uploads: int | None = None
    """Expired upload sessions removed (not counted in a dry run)."""
    temp_files: int | None = None
    duration: float = 0.0

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.blobs)

    def to_json(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "tags": [{"repository": name, "tag": tag} for name, tag in self.tags],
            "manifests": [{"repository": name, "digest": str(digest)} for name, digest in self.manifests],
            "layer_links": [{"repository": name, "digest": str(digest)} for name, digest in self.layer_links],
            "blobs": [{"digest": str(digest), "size": size} for digest, size in self.blobs],
            "repositories": self.repositories,
            "uploads": self.uploads,
            "temp_files": self.temp_files,
            "bytes_freed": self.bytes_freed,
            "duration_seconds": round(self.duration, 3),
        }


async def collect(driver: StorageDriver, settings: GcSettings, *, dry_run: bool = False,
                  now: float | None = None, evicted: dict[str, set[str]] | None = None) -> GcReport:
    """One collection. With `dry_run`, nothing changes and the report says what would go
    (it then takes no lock: `bytes_freed` is what a collection now would reclaim).
    `evicted`: repository -> digests a cache has just given up there (registry/proxy/eviction.py):
    unless something still references them, their links there and the blobs go regardless of
    the grace period (but never a blob another repository linked within it)."""
    started = time.monotonic()
    now = time.time() if now is None else now
    if dry_run:
        collector = Collector(driver, settings, None, now, evicted)
        await collector.mark(await collector.prune())
        collector.report.duration = time.monotonic() - started
        return collector.report
    async with driver.collection() as run:
        if run is None:
            return GcReport(skipped=True)
        collector = Collector(driver, settings, run, now, evicted)
        await collector.prune()
        await collector.mark()
        await collector.sweep()
        await collector.tidy()
    report = collector.report
    for items in (report.tags, report.manifests, report.layer_links, report.blobs, report.repositories):
        items.sort()
    report.duration = time.monotonic() - started
    return report


@dataclass(frozen=True)
class _Refs:
    blobs: tuple[str, ...]
    children: tuple[str, ...]
    subject: str | None


_UNREADABLE = _Refs((), (), None)  # missing, too large or not JSON: what it references is unknown


class Collector:
    """The phases of one collection, in order: prune, mark, sweep, tidy. With `run` None it
    only plans (a dry run); the tests drive the phases one by one to interleave pushes."""

    def __init__(self, driver: StorageDriver, settings: GcSettings, run: Collection | None, now: float,
                 evicted: dict[str, set[str]] | None = None):
        self.driver = driver
        self.settings = settings
        self.run = run
        self.now = now
        self.cutoff = now - settings.grace_seconds
        self.evicted = evicted or {}
        self.evicted_blobs = set().union(*self.evicted.values()) if self.evicted else set()
        self.report = GcReport(dry_run=run is None)
        self._refs: dict[str, _Refs] = {}  # manifest digest -> what it references (content never changes)
        self._slice_started = time.monotonic()
        self.reachable: set[str] = set()
        self.link_candidates: list[tuple[str, str]] = []
        self.blob_candidates: list[tuple[str, int]] = []
        self.emptied: list[str] = []

    # -- prune: retention rules, then untagged manifests --------------------------------
    async def prune(self) -> dict[str, RepositorySnapshot] | None:
        """Remove tags and manifests as configured. A dry run returns the snapshots as they
        would be afterwards; otherwise each repository is re-read and decided again under its
        lock before anything is removed."""
        if not (self.settings.retention or self.settings.delete_untagged):
            return None
        after = {}
        for name in await self.driver.list_repositories():
            snapshot = await self.driver.snapshot_repository(name)
            tags, manifests = await self._prune_plan(snapshot)
            if self.run is None:
                self.report.tags += [(name, tag) for tag in sorted(tags)]
                self.report.manifests += [(name, Digest.parse(d)) for d in sorted(manifests)]
                after[name] = _without(snapshot, tags, manifests)
                continue
            if not tags and not manifests:
                continue
            async with self.driver.repository_lock(name):
                snapshot = await self.driver.snapshot_repository(name)
                tags, manifests = await self._prune_plan(snapshot)
                for tag in sorted(tags):
                    if await self.driver.delete_tag(name, tag):
                        self.report.tags.append((name, tag))
                for digest in sorted(manifests):
                    with contextlib.suppress(ManifestNotFound):
                        await remove_manifest(self.driver, name, Digest.parse(digest), READ_LIMIT)
                        self.report.manifests.append((name, Digest.parse(digest)))
        return after

    async def _prune_plan(self, snapshot: RepositorySnapshot) -> tuple[set[str], set[str]]:
        tags = self._retention_plan(snapshot)
        manifests = await self._untagged_plan(snapshot, tags) if self.settings.delete_untagged else set()
        return tags, manifests

    def _retention_plan(self, snapshot: RepositorySnapshot) -> set[str]:
        """A tag goes only when every rule for the repository would remove it."""
        plan = None
        for rule in self.settings.retention:
            if rule.applies_to(snapshot.name):
                doomed = rule.tags_to_remove(snapshot.tags, self.now)
                plan = doomed if plan is None else plan & doomed
        return plan or set()

    async def _untagged_plan(self, snapshot: RepositorySnapshot, removed_tags: set[str]) -> set[str]:
        revisions = {str(d): mtime for d, mtime in snapshot.revisions.items()}
        await self._read_ahead(list(revisions))
        referrers: dict[str, list[str]] = {}
        for digest in revisions:
            refs = await self._references(digest)
            if refs is _UNREADABLE:
                return set()  # which manifests it keeps is unknown: none is judged untagged
            if refs.subject is not None:
                referrers.setdefault(refs.subject, []).append(digest)
            await self._pace()
        roots = {str(stamp.digest) for tag, stamp in snapshot.tags.items() if tag not in removed_tags}
        roots |= {digest for digest, mtime in revisions.items() if mtime >= self.cutoff}  # young: kept
        kept: set[str] = set()
        stack = [digest for digest in roots if digest in revisions]
        while stack:
            digest = stack.pop()
            if digest in kept:
                continue
            kept.add(digest)
            refs = await self._references(digest)
            linked = [*refs.children, *([refs.subject] if refs.subject else []), *referrers.get(digest, ())]
            stack += [d for d in linked if d in revisions and d not in kept]
            await self._pace()
        return set(revisions) - kept

    # -- mark ---------------------------------------------------------------------------
    async def mark(self, snapshots: dict[str, RepositorySnapshot] | None = None) -> None:
        """Find what is reachable, and the candidates: unreachable blobs and the links no
        manifest of their repository references, older than the grace period."""
        names = list(snapshots) if snapshots is not None else await self.driver.list_repositories()
        young_links: set[str] = set()
        for name in names:  # one repository in memory at a time
            if snapshots is not None:
                snapshot = snapshots[name]
            else:
                snapshot = await self.driver.snapshot_repository(name)
            manifests, blobs = await self._closure([str(d) for d in snapshot.revisions])
            referenced = manifests | blobs
            if any(self._refs.get(str(d)) is _UNREADABLE for d in snapshot.revisions):
                # A manifest of this repository does not read: it may need any blob linked here.
                referenced |= {str(d) for d in snapshot.layers}
            self.reachable |= referenced
            doomed = 0
            evicted_here = self.evicted.get(name, ())
            for digest, mtime in snapshot.layers.items():
                text = str(digest)
                if mtime >= self.cutoff and text not in evicted_here:
                    young_links.add(text)
                elif text not in referenced:
                    self.link_candidates.append((name, text))
                    doomed += 1
            if not snapshot.revisions and not snapshot.tags and doomed == len(snapshot.layers):
                self.emptied.append(name)  # removed after the sweep if nothing came back meanwhile
            await self._pace()
        async for blob in self.driver.iter_blobs():
            text = str(blob.digest)
            old_enough = blob.mtime < self.cutoff or text in self.evicted_blobs
            if old_enough and text not in self.reachable and text not in young_links:
                self.blob_candidates.append((text, blob.size))
            await self._pace()
        if self.run is None:
            self.report.layer_links = [(name, Digest.parse(d)) for name, d in sorted(self.link_candidates)]
            self.report.blobs = [(Digest.parse(d), size) for d, size in sorted(self.blob_candidates)]
            self.report.repositories = sorted(self.emptied)

    async def _closure(self, roots: list[str]) -> tuple[set[str], set[str]]:
        """The manifests reachable from `roots` (children and subjects, transitively) and the
        blobs they reference."""
        await self._read_ahead(roots)
        manifests: set[str] = set()
        blobs: set[str] = set()
        stack = list(roots)
        while stack:
            digest = stack.pop()
            if digest in manifests:
                continue
            manifests.add(digest)
            refs = await self._references(digest)
            blobs.update(refs.blobs)
            stack += [d for d in (*refs.children, refs.subject) if d is not None and d not in manifests]
            await self._pace()
        return manifests, blobs

    async def _read_ahead(self, digests: list[str]) -> None:
        missing = [d for d in digests if d not in self._refs]
        for start in range(0, len(missing), READ_AHEAD):
            await asyncio.gather(*[self._references(d) for d in missing[start:start + READ_AHEAD]])

    async def _references(self, digest: str) -> _Refs:
        refs = self._refs.get(digest)
        if refs is None:
            try:
                data = await self.driver.read_small_blob(Digest.parse(digest), READ_LIMIT)
                refs = references_of(data)
            except (BlobNotFound, TooLarge, InvalidDigest):
                refs = _UNREADABLE
            self._refs[digest] = refs
        return refs

    # -- sweep --------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Delete the candidates in batches, each under the exclusive guard, sparing what the
        journal names: links first, then blobs (a link never outlives its blob)."""
        assert self.run is not None, "a dry run deletes nothing"
        spared: set[str] = set()  # journaled, and what journaled manifests reference
        links = self.link_candidates
        blobs = self.blob_candidates
        for start in range(0, len(links), BATCH):
            await self._spare_journaled(spared)  # the bulk, before holding anyone off
            async with self.run.exclusive():
                await self._spare_journaled(spared)
                batch = [(name, d) for name, d in links[start:start + BATCH] if d not in spared]
                await self.driver.unlink_blobs([(name, Digest.parse(d)) for name, d in batch])
            self.report.layer_links += [(name, Digest.parse(d)) for name, d in batch]
        for start in range(0, len(blobs), BATCH):
            await self._spare_journaled(spared)
            async with self.run.exclusive():
                await self._spare_journaled(spared)
                batch = [(d, size) for d, size in blobs[start:start + BATCH] if d not in spared]
                await self.driver.delete_blobs([Digest.parse(d) for d, _ in batch])
            self.report.blobs += [(Digest.parse(d), size) for d, size in batch]
        if self.emptied:
            async with self.run.exclusive():
                for name in self.emptied:
                    if await self.driver.remove_repository_if_empty(name):
                        self.report.repositories.append(name)

    async def _spare_journaled(self, spared: set[str]) -> None:
        manifests, blobs = await self.run.read_journal()
        spared.update(str(d) for d in blobs)
        if manifests:
            found_manifests, found_blobs = await self._closure([str(d) for d in manifests])
            spared |= found_manifests | found_blobs

    # -- tidy ---------------------------------------------------------------------------
    async def tidy(self) -> None:
        self.report.temp_files = await self.driver.purge_temp(
            self.now - max(self.settings.grace_seconds, TEMP_MIN_AGE_SECONDS))
        self.report.uploads = await self.driver.purge_uploads(self.now - self.settings.upload_expiry_seconds)

    async def _pace(self) -> None:
        if time.monotonic() - self._slice_started > TIME_SLICE_SECONDS:
            await asyncio.sleep(0)
            self._slice_started = time.monotonic()


def _without(snapshot: RepositorySnapshot, tags: set[str], manifests: set[str]) -> RepositorySnapshot:
    return RepositorySnapshot(
        snapshot.name,
        {tag: stamp for tag, stamp in snapshot.tags.items()
         if tag not in tags and str(stamp.digest) not in manifests},
        {d: mtime for d, mtime in snapshot.revisions.items() if str(d) not in manifests},
        dict(snapshot.layers))


def references_of(data: bytes) -> _Refs:
    """What a stored manifest references, read leniently: one stored before a parsing rule
    was tightened must keep its blobs. Keys are matched as Go's JSON decoding would (case
    folded); anything that is not a valid digest is ignored."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return _UNREADABLE
    if not isinstance(doc, dict):
        return _UNREADABLE
    fields: dict[str, list] = {}
    for key, value in doc.items():
        fields.setdefault(key.casefold() if isinstance(key, str) else "", []).append(value)

    def digests(*names: str) -> tuple[str, ...]:
        found = []
        for name in names:
            for value in fields.get(name, []):
                for descriptor in value if isinstance(value, list) else [value]:
                    digest = _descriptor_digest(descriptor)
                    if digest is not None:
                        found.append(digest)
        return tuple(dict.fromkeys(found))

    subjects = digests("subject")
    return _Refs(digests("config", "layers", "blobs"), digests("manifests"), subjects[0] if subjects else None)


def _descriptor_digest(descriptor: object) -> str | None:
    if not isinstance(descriptor, dict):
        return None
    for key, value in descriptor.items():
        if isinstance(key, str) and key.casefold() == "digest":
            try:
                return sys.intern(str(Digest.parse(value)))  # one string per digest, however often named
            except InvalidDigest:
                return None
    return None
