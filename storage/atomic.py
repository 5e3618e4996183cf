"""Crash-safe file primitives: temp file -> fsync -> rename -> fsync(directory)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def write_temp(data: bytes, tmp_dir: Path) -> Path:
    """A new fsynced file in `tmp_dir` holding `data`, to be installed with a rename."""
    tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_durably(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise
    return tmp


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    tmp = write_temp(data, tmp_dir)
    try:
        install(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(tmp: Path, path: Path) -> None:
    """Rename an fsynced file into place and make the rename durable."""
    make_dirs(path.parent)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entries survive a power cut."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)
