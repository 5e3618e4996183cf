"""Verify a filesystem store: re-hash every blob and check every link."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ocispec.digest import Digest, InvalidDigest, new_hasher
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest

from .layout import Layout, is_valid_upload_id, walk_repositories

CHUNK = 1 << 20
CACHE_ORIGIN_RECORD = "origin"  # in a repository a pull-through cache fills (registry/proxy/)


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


def fsck(root: Path) -> Report:
    layout = Layout(Path(root))
    report = Report()
    if not layout.blobs.is_dir():
        report.problems.append(f"{root} is not a Kura store (no blobs/ directory)")
        return report
    _check_blobs(layout, report)
    for name in walk_repositories(layout):
        report.repositories += 1
        _check_repository(layout, name, report)
    _check_uploads(layout, report)
    leftovers = len(os.listdir(layout.tmp)) if layout.tmp.is_dir() else 0
    if leftovers:
        report.notes.append(f"{leftovers} unfinished temp file(s) in tmp/ (harmless; purged with old uploads)")
    return report


def _check_blobs(layout: Layout, report: Report) -> None:
    for algorithm_dir in sorted(p for p in layout.blobs.iterdir() if p.is_dir()):
        for prefix_dir in sorted(algorithm_dir.iterdir()):
            for path in sorted(prefix_dir.iterdir()):
                report.blobs += 1
                try:
                    digest = Digest.parse(f"{algorithm_dir.name}:{path.name}")
                except InvalidDigest:
                    report.problems.append(f"stray file in blob store: {path}")
                    continue
                if path.name[:2] != prefix_dir.name:
                    report.problems.append(f"blob {digest} is filed under the wrong prefix: {path}")
                actual = _hash(path, digest.algorithm)
                if actual != digest.encoded:
                    report.problems.append(f"blob {digest} is corrupt: content hashes to {actual}")


def _hash(path: Path, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _digests_in(directory: Path) -> list[tuple[Path, Digest | None]]:
    found = []
    if not directory.is_dir():
        return found
    for algorithm_dir in sorted(directory.iterdir()):
        for path in sorted(algorithm_dir.iterdir()):
            try:
                found.append((path, Digest.parse(f"{algorithm_dir.name}:{path.name}")))
            except InvalidDigest:
                found.append((path, None))
    return found


def _check_repository(layout: Layout, name: str, report: Report) -> None:
    linked_blobs = set()
    for path, digest in _digests_in(layout.repository(name) / "_layers"):
        if digest is None:
            report.problems.append(f"{name}: stray layer link {path}")
        elif not layout.blob(digest).is_file():
            report.problems.append(f"{name}: layer link {digest} points at a missing blob")
        else:
            linked_blobs.add(digest)

    manifests = {}
    present: set[Digest] = set()
    for path, digest in _digests_in(layout.revisions(name)):
        report.manifests += 1
        if digest is None:
            report.problems.append(f"{name}: stray manifest link {path}")
            continue
        try:
            record = json.loads(path.read_bytes())
            media_type = record["mediaType"]
            if not isinstance(media_type, str):
                raise TypeError("mediaType is not a string")
        except (ValueError, KeyError, TypeError, RecursionError):
            report.problems.append(f"{name}: manifest link {digest} is unreadable")
            continue
        blob = layout.blob(digest)
        if not blob.is_file():
            report.problems.append(f"{name}: manifest {digest} is missing from the blob store")
            continue
        present.add(digest)  # reported below if it does not parse, but it is there
        try:
            manifests[digest] = parse_manifest(blob.read_bytes(), media_type)
        except (ManifestInvalid, ManifestUnsupported) as exc:
            report.problems.append(f"{name}: manifest {digest} does not parse: {exc}")

    # A pull-through cache stores a manifest first and its blobs when they are pulled.
    cached = layout.cache_record(name, CACHE_ORIGIN_RECORD).is_file()
    for digest, manifest in manifests.items():
        for descriptor in manifest.blobs:
            if descriptor.urls:
                continue
            if not layout.blob(descriptor.digest).is_file():
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

    tags_dir = layout.tags(name)
    for tag_path in sorted(tags_dir.iterdir()) if tags_dir.is_dir() else []:
        report.tags += 1
        try:
            target = Digest.parse(tag_path.read_text())
        except InvalidDigest:
            report.problems.append(f"{name}: tag {tag_path.name} is unreadable")
            continue
        if target not in present:
            report.problems.append(f"{name}: tag {tag_path.name} points at missing manifest {target}")

    referrers_dir = layout.repository(name) / "_referrers"
    for subject_path, _ in _digests_in(referrers_dir):
        for entry in sorted(subject_path.iterdir()):
            try:
                referrer = Digest.parse(entry.name.replace("-", ":", 1))
            except InvalidDigest:
                report.problems.append(f"{name}: stray referrer entry {entry}")
                continue
            if referrer not in present:
                report.problems.append(f"{name}: referrer entry {referrer} names a missing manifest")


def _check_uploads(layout: Layout, report: Report) -> None:
    if not layout.uploads.is_dir():
        return
    sessions = [e for e in os.listdir(layout.uploads) if is_valid_upload_id(e)]
    if sessions:
        report.notes.append(f"{len(sessions)} upload session(s) in progress or abandoned")
