"""Apply image layers to a root filesystem as if every layer were hostile.

Every path is resolved component by component from an open descriptor of the root, with
O_NOFOLLOW, so nothing outside the rootfs is ever created, changed or removed: a symlink met
as a parent is followed *inside* the root (an absolute target starts again at the root and
`..` stops there, as under chroot), and the entry's own final component is never followed.
The directories of the last path walked stay open for the next entry (dirchain.py: real
directories only, forgotten whenever a directory is removed); a path through a symlink is
walked in full each time. Entry names with `..` or absolute paths are refused with an error
naming the entry. Changes follow the image-spec: `.wh.NAME` removes NAME from lower layers,
`.wh..wh..opq` empties a directory of what lower layers put there, hardlinks point inside the
root, modes (with setuid/setgid/sticky), mtimes, owners (as root) and xattrs (where allowed)
are kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import NamedTuple

from .dirchain import DIR_FLAGS as _DIR_FLAGS
from .dirchain import DirectoryChain
from .layers import DecompressedLayer
from .pathtree import PathTree
from .tarreader import UnsafeLayer, member_data, open_layer_tar, tar_members

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINK_HOPS = 40
# Directories' xattrs wait in memory until their layer is done; each costs its bytes and about
# this much in Python objects.
MAX_DIRECTORY_XATTR_BYTES = 16 << 20
_XATTR_OVERHEAD = 100
_XATTR_PREFIX = "SCHILY.xattr."


@dataclass
class UnpackOptions:
    allow_devices: bool = False
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    notes: list[str] = field(default_factory=list)

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def clean_name(name: str) -> list[str]:
    """An entry name as components inside the root; refuses absolute and `..` names."""
    if name.startswith("/"):
        raise UnsafeLayer(f"entry {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeLayer(f"entry {name!r}: contains '..'")
    if "\x00" in name:
        raise UnsafeLayer(f"entry {name!r}: NUL byte in name")
    return parts


class Root:
    """Operations on paths inside a rootfs directory, never leaving it."""

    def __init__(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.fd = os.open(path, _DIR_FLAGS)
        self._chain = DirectoryChain(self.fd)

    def close(self) -> None:
        self._chain.clear()
        os.close(self.fd)

    def walk(self, parts: list[str], create: bool, entry: str) -> int:
        """An fd of the directory at `parts`, following symlinks only inside the root."""
        if all(p not in ("", ".", "..") for p in parts):
            fd = self._chain.open(parts, create)
            if fd is not None:
                return fd
        return self._walk_in_full(parts, create, entry)  # a symlink (or a non-directory) on the way

    def _walk_in_full(self, parts: list[str], create: bool, entry: str) -> int:
        stack = [os.dup(self.fd)]
        pending = list(parts)
        hops = 0
        try:
            while pending:
                comp = pending.pop(0)
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                try:
                    stack.append(os.open(comp, _DIR_FLAGS, dir_fd=stack[-1]))
                    continue
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=stack[-1])
                    stack.append(os.open(comp, _DIR_FLAGS, dir_fd=stack[-1]))
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise UnsafeLayer(f"entry {entry!r}: {comp!r} in its path is not a directory")
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise UnsafeLayer(f"entry {entry!r}: too many symlinks in its path")
                target = os.readlink(comp, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending = target.split("/") + pending
            result = stack.pop()
            return result
        finally:
            for fd in stack:
                os.close(fd)

    def remove(self, parent: int, name: str) -> None:
        """Remove whatever is at `name` (a directory with all it holds), never following links."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._chain.clear()  # it may hold that directory open (or one below it)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)


class _Directory(NamedTuple):
    """What the metadata pass needs of a directory entry (never the entry's whole PAX header)."""
    device: int
    inode: int
    uid: int
    gid: int
    mode: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]


def apply_layer(root: Root, tar_stream: DecompressedLayer, options: UnpackOptions) -> None:
    created = PathTree()  # what this layer made (and their parents): whiteouts do not touch it
    xattr_bytes = 0
    with open_layer_tar(tar_stream) as archive:
        for member in tar_members(archive):
            parts = clean_name(member.name)
            if not parts:
                continue  # the root itself: "./"
            base = parts[-1]
            if base == OPAQUE:
                _opaque(root, parts[:-1], created, member.name)
                continue
            if base.startswith(WHITEOUT):
                target = base[len(WHITEOUT):]
                if target in ("", ".", ".."):
                    raise UnsafeLayer(f"entry {member.name!r}: whiteout of {target!r}")
                _whiteout(root, parts[:-1], target, created, member.name)
                continue
            identity = _apply_member(root, archive, member, parts, options)
            directory = None
            if identity is not None:
                xattrs = _xattrs(member)
                xattr_bytes += sum(len(name) + len(value) + _XATTR_OVERHEAD for name, value in xattrs)
                if xattr_bytes > MAX_DIRECTORY_XATTR_BYTES:
                    raise UnsafeLayer(f"entry {member.name!r}: the layer's directories carry more than "
                                      f"{MAX_DIRECTORY_XATTR_BYTES} bytes of extended attributes")
                directory = _Directory(*identity, member.uid, member.gid, member.mode & 0o7777,
                                       _mtime_ns(member), xattrs)
            created.add(parts, directory)
    # Directory metadata last (adding children changes mtimes; children before their parents),
    # applied through a descriptor of the very directory made earlier: if a later entry
    # replaced it, it is skipped.
    for parts, directory in created.values_deepest_first():
        _set_directory_metadata(root, parts, directory, options)
    tar_stream.drain()


def _set_directory_metadata(root: Root, parts: list[str], directory: _Directory, options: UnpackOptions) -> None:
    try:
        parent = root.walk(list(parts[:-1]), create=False, entry="/".join(parts))
    except (FileNotFoundError, NotADirectoryError, UnsafeLayer):
        return
    try:
        fd = os.open(parts[-1], _DIR_FLAGS | os.O_NONBLOCK, dir_fd=parent)
    except OSError:
        return  # replaced by a non-directory or a link since
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (directory.device, directory.inode):
            return
        if options.as_root:
            os.fchown(fd, directory.uid, directory.gid)
        os.fchmod(fd, directory.mode)
        _set_xattrs(fd, directory.xattrs, options)
        os.utime(fd, ns=(directory.mtime_ns,) * 2)
    finally:
        os.close(fd)


def _opaque(root: Root, dir_parts: list[str], created: PathTree, entry: str) -> None:
    try:
        fd = root.walk(dir_parts, create=True, entry=entry)
    except FileNotFoundError:
        return
    try:
        made = created.names_under(dir_parts)
        for name in os.listdir(fd):
            if name not in made:
                root.remove(fd, name)
    finally:
        os.close(fd)


def _whiteout(root: Root, dir_parts: list[str], target: str, created: PathTree, entry: str) -> None:
    if dir_parts + [target] in created:
        return  # whiteouts only hide lower layers
    try:
        fd = root.walk(dir_parts, create=False, entry=entry)
    except FileNotFoundError:
        return
    try:
        root.remove(fd, target)
    finally:
        os.close(fd)


def _apply_member(root: Root, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str],
                  options: UnpackOptions) -> tuple[int, int] | None:
    """Apply one entry; for a directory, return its (device, inode) for the metadata pass.

    Each kind is made first and what a lower layer left at its name removed only when that
    fails with EEXIST (then made again): in a layer over nothing, no name is looked at twice."""
    name = parts[-1]
    parent = root.walk(parts[:-1], create=True, entry=member.name)
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    root.remove(parent, name)
                    os.mkdir(name, 0o700, dir_fd=parent)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            return st.st_dev, st.st_ino  # metadata once the layer is done
        if member.isreg():
            fd = _replacing(root, parent, name, lambda: os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent))
            try:
                for chunk in member_data(archive, member):
                    _write_all(fd, chunk)
                _set_file_metadata(fd, member, options)
            finally:
                os.close(fd)
            return None
        elif member.issym():
            # stored as-is, never resolved here
            _replacing(root, parent, name, lambda: os.symlink(member.linkname, name, dir_fd=parent))
        elif member.islnk():
            _hardlink(root, parent, name, member)
            return None  # a hardlink shares its target's metadata
        elif member.isfifo():
            _replacing(root, parent, name, lambda: os.mkfifo(name, 0o600, dir_fd=parent))
        elif member.ischr() or member.isblk():
            if not (options.allow_devices and options.as_root):
                options.note_once("device nodes skipped (use --allow-devices, as root)")
                root.remove(parent, name)  # as an entry it still replaces what was there
                return None
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            _replacing(root, parent, name, lambda: os.mknod(name, kind | 0o600, device, dir_fd=parent))
        else:
            options.note_once(f"skipped entries of unsupported tar type {member.type!r}")
            root.remove(parent, name)
            return None
        _set_metadata(parent, name, member, options)
        return None
    finally:
        os.close(parent)


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written:])


def _replacing(root: Root, parent: int, name: str, make):
    """`make()` a new entry at `name`; if something is there already, remove it and make again."""
    try:
        return make()
    except FileExistsError:
        root.remove(parent, name)
        return make()


def _hardlink(root: Root, parent: int, name: str, member: tarfile.TarInfo) -> None:
    try:
        link_parts = clean_name(member.linkname)
    except UnsafeLayer as exc:
        raise UnsafeLayer(f"entry {member.name!r}: hardlink target {exc}") from None
    if not link_parts:
        raise UnsafeLayer(f"entry {member.name!r}: hardlink to the root")
    missing = UnsafeLayer(f"entry {member.name!r}: hardlink target {member.linkname!r} does not exist")
    try:
        source_dir = root.walk(link_parts[:-1], create=False, entry=member.name)
    except FileNotFoundError:
        raise missing from None
    try:
        source_stat = os.stat(link_parts[-1], dir_fd=source_dir, follow_symlinks=False)
        if stat.S_ISDIR(source_stat.st_mode):
            raise UnsafeLayer(f"entry {member.name!r}: hardlink to a directory")
        _replacing(root, parent, name, lambda: os.link(
            link_parts[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False))
    except FileNotFoundError:
        raise missing from None
    finally:
        os.close(source_dir)


def _set_file_metadata(fd: int, member: tarfile.TarInfo, options: UnpackOptions) -> None:
    """Owner, mode, xattrs and mtime of a regular file just written, all through its descriptor."""
    if options.as_root:
        os.fchown(fd, member.uid, member.gid)
    else:
        options.note_once("not running as root: files are owned by the current user, not the image's owners")
    os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid
    _set_xattrs(fd, _xattrs(member), options)
    os.utime(fd, ns=(_mtime_ns(member),) * 2)  # last: the writes set it


def _set_metadata(parent: int, name: str, member: tarfile.TarInfo, options: UnpackOptions) -> None:
    """Owner, mode and mtime of a symlink, FIFO or device node just made at `name`."""
    if options.as_root:
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
    else:
        options.note_once("not running as root: files are owned by the current user, not the image's owners")
    if not member.issym():
        os.chmod(name, member.mode & 0o7777, dir_fd=parent)  # just created by us: not a link; never opened
    os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=parent, follow_symlinks=False)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1e9)


def _xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    return tuple((key[len(_XATTR_PREFIX):], value.encode("utf-8", "surrogateescape"))
                 for key, value in (member.pax_headers or {}).items() if key.startswith(_XATTR_PREFIX))


def _set_xattrs(fd: int, xattrs: tuple[tuple[str, bytes], ...], options: UnpackOptions) -> None:
    for name, value in xattrs:
        try:
            os.setxattr(fd, name, value)
        except OSError:
            options.note_once("some extended attributes could not be set on this filesystem")
