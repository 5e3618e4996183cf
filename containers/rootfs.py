"""A container's root filesystem: an overlay of the image's shared lower directory and the
container's own upper directory, or, where overlayfs cannot be mounted (not root, an old
kernel, a filesystem it refuses), a private copy of the lower directory."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from pathlib import Path

MNT_DETACH = 2
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> str | None:
    """Mount (the first of `lowers` on top); None when done, else why it could not be."""
    for path in (*lowers, upper, work, target):
        if any(c in str(path) for c in ",:\\"):
            return f"overlayfs options cannot name {path}"
    if os.geteuid() != 0:
        return "overlayfs needs root"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    options = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}".encode()
    if _c().mount(b"overlay", str(target).encode(), b"overlay", 0, options) != 0:
        code = ctypes.get_errno()
        return f"mounting overlayfs failed: {os.strerror(code)}"
    return None


def copy_lower(lower: Path, target: Path) -> None:
    """A private copy, owners, modes, links and xattrs kept (cp -a)."""
    result = subprocess.run(["cp", "-a", "--reflink=auto", f"{lower}/.", str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"copying the image's files failed: {result.stderr.strip()}")


def unmount(target: Path) -> None:
    if not os.path.ismount(target):
        return
    if _c().umount2(str(target).encode(), 0) != 0:
        code = ctypes.get_errno()
        if code == errno.EBUSY:  # still in use (a shell cd'ed there): detach it now, gone when unused
            if _c().umount2(str(target).encode(), MNT_DETACH) == 0:
                return
            code = ctypes.get_errno()
        raise OSError(code, f"unmounting {target}: {os.strerror(code)}")


def mountpoints(lower: Path, init: Path, mounts: list[dict]) -> bool:
    """Make in `init` (a layer between the image's and the container's, as Docker's init layer)
    the bind mounts' destinations the image lacks, so that runc finds them there instead of
    creating them in the container's upper directory, where `kura diff` would list them.
    Returns whether it made any."""
    made = False
    for mount in mounts:
        if mount.get("type") != "bind":
            continue
        parts = [p for p in mount["destination"].split("/") if p]
        missing = None
        for depth in range(1, len(parts) + 1):
            try:
                st = os.lstat(lower.joinpath(*parts[:depth]))
            except FileNotFoundError:
                missing = depth
                break
            if stat.S_ISLNK(st.st_mode):
                break  # runc resolves links inside the rootfs itself; leave that to it
        if missing is None:
            continue
        parent = init.joinpath(*parts[:-1])
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        place = init.joinpath(*parts)
        if os.path.isdir(mount.get("source", "")):
            place.mkdir(mode=0o755, exist_ok=True)
        else:
            place.touch(mode=0o644)
        made = True
    return made
