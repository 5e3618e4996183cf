"""`kura diff`: what a container changed, read from its overlayfs upper directory against the
image's lower directory, in `docker diff`'s A/C/D lines.

As Docker's overlay driver reads it: a whiteout (a 0/0 character device) is a deletion; an entry
absent from the lower directory is added, and so is everything under an added directory; one
present there is changed, except a directory whose mode, size and mtime equal the lower one's
(it is in the upper directory only to hold what changed below it); the parent of an added or
deleted entry is changed. An opaque directory (rmdir'ed and made again) is changed, and what the
lower directory holds under it that the upper one does not is deleted. Lines are in Docker's walk
order: by path, component by component.

The walk opens every directory without following symlinks: a running container may be changing
the upper directory meanwhile, and must not make the walk leave it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")  # the second with the userxattr option


def changes(upper: Path, lower: Path) -> list[tuple[str, str]]:
    """[("A"|"C"|"D", "/path")] in the order `docker diff` prints them."""
    found: dict[str, str] = {}
    upper_fd = os.open(upper, _DIR_FLAGS)
    try:
        lower_fd = os.open(lower, _DIR_FLAGS)
        try:
            _walk(upper_fd, lower_fd, "", False, found)
        finally:
            os.close(lower_fd)
    finally:
        os.close(upper_fd)
    for path, kind in list(found.items()):
        parent = path.rpartition("/")[0]
        if kind in "AD" and parent and parent not in found:
            found[parent] = "C"
    return sorted(((kind, path) for path, kind in found.items()),
                  key=lambda change: [os.fsencode(part) for part in change[1].split("/")])


def _walk(upper_fd: int, lower_fd: int | None, prefix: str, hidden: bool, found: dict[str, str]) -> None:
    """One upper directory against its lower one (None: there is none). `hidden`: an opaque
    directory here or above hides the lower one, so whatever it holds that this one does not
    is deleted."""
    with os.scandir(upper_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    if hidden and lower_fd is not None:
        names = {e.name for e in entries}
        with os.scandir(lower_fd) as it:
            for gone in it:
                if gone.name not in names:
                    found[f"{prefix}/{gone.name}"] = "D"
    for entry in entries:
        path = f"{prefix}/{entry.name}"
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed by the running container since the listing
            continue
        before = _lstat(lower_fd, entry.name)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            found[path] = "D"
        elif not stat.S_ISDIR(st.st_mode):
            found[path] = "A" if before is None else "C"
        else:
            try:
                _directory(upper_fd, lower_fd, entry.name, path, st, before, hidden, found)
            except FileNotFoundError:  # the same, for a directory
                continue
            except OSError as exc:  # replaced by a file or a link meanwhile (O_NOFOLLOW)
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                found[path] = "A" if before is None else "C"


def _directory(upper_fd: int, lower_fd: int | None, name: str, path: str, st: os.stat_result,
               before: os.stat_result | None, hidden: bool, found: dict[str, str]) -> None:
    child_upper = os.open(name, _DIR_FLAGS, dir_fd=upper_fd)
    child_lower = None
    try:
        if before is None:
            found[path] = "A"
        else:
            hidden = hidden or _opaque(child_upper)
            if stat.S_ISDIR(before.st_mode):
                child_lower = os.open(name, _DIR_FLAGS, dir_fd=lower_fd)
            if hidden or child_lower is None or not _same_directory(st, before):
                found[path] = "C"
        _walk(child_upper, child_lower, path, hidden, found)
    finally:
        os.close(child_upper)
        if child_lower is not None:
            os.close(child_lower)


def _lstat(dir_fd: int | None, name: str) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:  # not set, or xattrs unsupported
            continue
    return False


def _same_directory(a: os.stat_result, b: os.stat_result) -> bool:
    """Docker's test: same mode and size, and the same mtime (to the second when either side
    has no nanoseconds)."""
    if a.st_mode != b.st_mode or a.st_size != b.st_size:
        return False
    if a.st_mtime_ns == b.st_mtime_ns:
        return True
    seconds_a, nanos_a = divmod(a.st_mtime_ns, 10**9)
    seconds_b, nanos_b = divmod(b.st_mtime_ns, 10**9)
    return seconds_a == seconds_b and (nanos_a == 0 or nanos_b == 0)
