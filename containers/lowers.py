"""An image's layers unpacked once into a read-only lower directory, shared by every container
of the image (by manifest digest). Unpacked into a temp directory, flushed, then renamed: a
crash leaves a temp directory (removed by the next unpack), never a half lower."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

from ocispec.digest import Digest
from puller.bundle import unpack_layers
from puller.store import Store

from .state import alive, private_directory, process_start


def lower_directory(lowers: Path, digest: Digest) -> Path:
    return lowers / f"{digest.algorithm}-{digest.encoded}"


def ensure_lower(store: Store, lowers: Path, digest: Digest) -> Path:
    target = lower_directory(lowers, digest)
    if target.is_dir():
        return target
    private_directory(lowers.parent)
    private_directory(lowers)
    _remove_abandoned(lowers)
    me = os.getpid()
    tmp = lowers / f".tmp-{me}-{process_start(me)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _, options = unpack_layers(store, digest, tmp / "rootfs", allow_devices=os.geteuid() == 0)
        for note in options.notes:
            print(f"kura: note: {note}", file=sys.stderr)
        os.sync()  # the files' data on disk before the rename makes them the lower
        try:
            os.rename(tmp / "rootfs", target)
        except OSError:
            if not target.is_dir():  # else another `kura run` unpacked it first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_abandoned(lowers: Path) -> None:
    """Temp directories of unpacks whose process is gone."""
    for path in lowers.glob(".tmp-*"):
        parts = path.name.split("-")
        if len(parts) >= 4 and parts[1].isdigit() and not alive(int(parts[1]), parts[2]):
            shutil.rmtree(path, ignore_errors=True)


def prune(store: Store, lowers: Path) -> None:
    """Remove the lower directories of images no longer in the store (`kura rmi` cannot: the
    client library knows nothing of containers). An image a container holds is never removed,
    so neither is its lower."""
    if not lowers.is_dir():
        return
    stored = {image.descriptor.get("digest") for image in store.images()}
    for path in lowers.iterdir():
        algorithm, _, encoded = path.name.partition("-")
        digest = f"{algorithm}:{encoded}"
        if not path.name.startswith(".tmp-") and digest not in stored and not store.holders(digest):
            shutil.rmtree(path, ignore_errors=True)
