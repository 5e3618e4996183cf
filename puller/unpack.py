"""Apply image layers to a root filesystem as if every layer were hostile.

Every path is resolved component by component from an open descriptor of the root, with
O_NOFOLLOW, so nothing outside the rootfs is ever created, changed or removed: a symlink met
as a parent is followed *inside* the root (an absolute target starts again at the root and
`..` stops there, as under chroot), and the entry's own final component is never followed.
Entry names with `..` or absolute paths are refused with an error naming the entry. Changes
follow the image-spec: `.wh.NAME` removes NAME from lower layers, `.wh..wh..opq` empties a
directory of what lower layers put there, hardlinks point inside the root, modes (with
setuid/setgid/sticky), mtimes, owners (as root) and xattrs (where allowed) are kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field

from .layers import CHUNK, DecompressedLayer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINK_HOPS = 40
# PAX and GNU long-name headers are read whole into memory: at most this (Go's archive/tar,
# which containerd and Docker unpack with, has the same bound).
MAX_SPECIAL_HEADER = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeLayer(ValueError):
    """A layer entry that would reach outside the rootfs, or cannot be applied safely."""


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

    def close(self) -> None:
        os.close(self.fd)

    def walk(self, parts: list[str], create: bool, entry: str) -> int:
        """An fd of the directory at `parts`, following symlinks only inside the root."""
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
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile_):
        if self.type in _SPECIAL_HEADERS and self.size > MAX_SPECIAL_HEADER:
            raise UnsafeLayer(f"a tar extended header of {self.size} bytes (more than {MAX_SPECIAL_HEADER})")
        return super()._proc_member(tarfile_)


_SPECIAL_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


def tar_members(archive: tarfile.TarFile):
    """The entries of a tar read once in order, without TarFile keeping each one in `.members`
    (a layer of a million entries would otherwise hold them all until the end)."""
    while (member := archive.next()) is not None:
        archive.members.clear()
        yield member


def apply_layer(root: Root, tar_stream: DecompressedLayer, options: UnpackOptions) -> None:
    created: set[tuple[str, ...]] = set()  # what this layer made (and their parents): whiteouts do not touch it
    directories: list[tuple[tuple[str, ...], tarfile.TarInfo, tuple[int, int]]] = []
    with tarfile.open(fileobj=tar_stream, mode="r|", errorlevel=2, tarinfo=_BoundedTarInfo) as archive:
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
            for i in range(1, len(parts) + 1):
                created.add(tuple(parts[:i]))
            if identity is not None:
                directories.append((tuple(parts), member, identity))
    # Directory metadata last (adding children changes mtimes), applied through a descriptor
    # of the very directory made earlier: if a later entry replaced it, it is skipped.
    for parts, member, identity in reversed(directories):
        _set_directory_metadata(root, parts, member, identity, options)
    tar_stream.drain()


def _set_directory_metadata(root: Root, parts: tuple[str, ...], member: tarfile.TarInfo,
                            identity: tuple[int, int], options: UnpackOptions) -> None:
    try:
        parent = root.walk(list(parts[:-1]), create=False, entry=member.name)
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
        if (st.st_dev, st.st_ino) != identity:
            return
        if options.as_root:
            os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        _set_xattrs(fd, member, options)
        os.utime(fd, ns=(int(member.mtime * 1e9),) * 2)
    finally:
        os.close(fd)


def _opaque(root: Root, dir_parts: list[str], created: set, entry: str) -> None:
    try:
        fd = root.walk(dir_parts, create=True, entry=entry)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(fd):
            if tuple(dir_parts + [name]) not in created:
                root.remove(fd, name)
    finally:
        os.close(fd)


def _whiteout(root: Root, dir_parts: list[str], target: str, created: set, entry: str) -> None:
    if tuple(dir_parts + [target]) in created:
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
    """Apply one entry; for a directory, return its (device, inode) for the metadata pass."""
    name = parts[-1]
    parent = root.walk(parts[:-1], create=True, entry=member.name)
    try:
        if member.isdir():
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    root.remove(parent, name)
                    os.mkdir(name, 0o700, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            return st.st_dev, st.st_ino  # metadata once the layer is done
        root.remove(parent, name)
        if member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            try:
                source = archive.extractfile(member)
                while chunk := source.read(CHUNK):
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)  # stored as-is, never resolved here
        elif member.islnk():
            try:
                link_parts = clean_name(member.linkname)
            except UnsafeLayer as exc:
                raise UnsafeLayer(f"entry {member.name!r}: hardlink target {exc}") from None
            if not link_parts:
                raise UnsafeLayer(f"entry {member.name!r}: hardlink to the root")
            try:
                source_dir = root.walk(link_parts[:-1], create=False, entry=member.name)
            except FileNotFoundError:
                raise UnsafeLayer(f"entry {member.name!r}: hardlink target {member.linkname!r} does not exist") from None
            try:
                source_stat = os.stat(link_parts[-1], dir_fd=source_dir, follow_symlinks=False)
                if stat.S_ISDIR(source_stat.st_mode):
                    raise UnsafeLayer(f"entry {member.name!r}: hardlink to a directory")
                os.link(link_parts[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafeLayer(f"entry {member.name!r}: hardlink target {member.linkname!r} does not exist") from None
            finally:
                os.close(source_dir)
            return None  # a hardlink shares its target's metadata
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        elif member.ischr() or member.isblk():
            if not (options.allow_devices and options.as_root):
                options.note_once("device nodes skipped (use --allow-devices, as root)")
                return None
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
        else:
            options.note_once(f"skipped entries of unsupported tar type {member.type!r}")
            return None
        _set_metadata(parent, name, member, options, is_link=member.issym())
        return None
    finally:
        os.close(parent)


def _set_metadata(parent: int, name: str, member: tarfile.TarInfo, options: UnpackOptions, is_link: bool) -> None:
    if options.as_root:
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
    else:
        options.note_once("not running as root: files are owned by the current user, not the image's owners")
    if member.isfifo() or member.ischr() or member.isblk():
        os.chmod(name, member.mode & 0o7777, dir_fd=parent)  # just created by us: not a link; never opened
    elif not is_link:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid
            _set_xattrs(fd, member, options)
        finally:
            os.close(fd)
    os.utime(name, ns=(int(member.mtime * 1e9),) * 2, dir_fd=parent, follow_symlinks=False)


def _set_xattrs(fd: int, member: tarfile.TarInfo, options: UnpackOptions) -> None:
    for key, value in (member.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            try:
                os.setxattr(fd, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"))
            except OSError:
                options.note_once("some extended attributes could not be set on this filesystem")
