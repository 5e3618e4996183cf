"""The directories along the last path walked inside a rootfs, kept open.

A layer lists a directory before what it holds and keeps a tree's entries together, so the next
entry's parent is nearly always a directory of the last path walked or a child of one: keeping
that path's descriptors open, a walk costs one openat per directory it has not met yet instead of
one per component of every entry.

Only real directories are kept, each opened with O_NOFOLLOW|O_DIRECTORY from the one before it,
starting at the root, so the names kept are also the canonical path of what is open: nothing kept
was reached through a symlink. A path that meets a symlink or a non-directory is handed back
undone (the caller walks it in full, with its rules for links). A directory removed while kept
must be forgotten (`clear`), or a later entry would land in it rather than in what took its place.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Deeper paths are walked in full each time, as before: a chain that deep would hold that many
# descriptors between entries, against the process's limit.
MAX_DEPTH = 128


class DirectoryChain:
    def __init__(self, root_fd: int):
        self._root = root_fd  # borrowed: the caller closes it, after `clear`
        self._names: list[str] = []
        self._fds: list[int] = []  # _fds[i] is the directory _names[:i + 1]

    def open(self, parts: Sequence[str], create: bool) -> int | None:
        """A new descriptor (the caller closes it) of the directory at `parts`, made with its
        missing parents if `create`; None when a component is a symlink or not a directory.
        `parts` are plain names: no "", "." or ".."."""
        if len(parts) > MAX_DEPTH:
            return None
        names, fds = self._names, self._fds
        common, limit = 0, min(len(names), len(parts))
        while common < limit and names[common] == parts[common]:
            common += 1
        self._keep(common)
        for name in parts[common:]:
            parent = fds[-1] if fds else self._root
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=parent)
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    return None
                raise
            names.append(name)
            fds.append(fd)
        return os.dup(fds[-1] if fds else self._root)

    def _keep(self, count: int) -> None:
        while len(self._fds) > count:
            os.close(self._fds.pop())
            self._names.pop()

    def clear(self) -> None:
        self._keep(0)
