"""`kura diff`: `docker diff`'s A/C/D lines from an overlay upper directory, on upper and lower
trees built by hand (whiteouts and trusted.* xattrs need root, as overlayfs does), then on a real
overlayfs mount changed through its merged view."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

from containers.diff import changes

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted.* xattrs need root")
MTIME = 1_600_000_000


@pytest.fixture
def trees(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for path in ("etc/apt/sources.list.d", "tmp", "usr/share/doc/foo", "var/lib"):
        (lower / path).mkdir(parents=True)
    for path, text in (("etc/motd", "hi"), ("etc/hostname", "h"), ("etc/apt/sources.list", "deb"),
                       ("etc/apt/sources.list.d/x.list", "deb"), ("usr/share/doc/foo/copyright", "c")):
        (lower / path).write_text(text)
    upper.mkdir()
    return upper, lower


def copy_up(upper: Path, lower: Path, relative: str) -> Path:
    """The upper directory's copy of a lower directory, as overlayfs makes it: same mode and mtime."""
    path = upper / relative
    path.mkdir(parents=True, exist_ok=True)
    for part in [relative] + [str(p) for p in Path(relative).parents if str(p) != "."]:
        st = os.stat(lower / part)
        os.chmod(upper / part, st.st_mode & 0o7777)
        os.utime(upper / part, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path


def whiteout(path: Path) -> None:
    os.mknod(path, 0o020000, os.makedev(0, 0))


def settle(upper: Path, lower: Path) -> None:
    """Equal mtimes on every directory both trees hold (as after a copy-up), before the test
    changes the ones it means to change."""
    for dirpath, _, _ in os.walk(lower):
        relative = os.path.relpath(dirpath, lower)
        if (upper / relative).is_dir():
            os.utime(upper / relative, (MTIME, MTIME))
        os.utime(dirpath, (MTIME, MTIME))


def lines(upper: Path, lower: Path) -> list[str]:
    return [f"{kind} {path}" for kind, path in changes(upper, lower)]


def test_nothing_changed(trees):
    assert changes(*trees) == []


@needs_root
def test_the_issues_example(trees):
    """touch /tmp/new && rm /etc/hostname && echo x >> /etc/motd"""
    upper, lower = trees
    etc, tmp = copy_up(upper, lower, "etc"), copy_up(upper, lower, "tmp")
    settle(upper, lower)
    (tmp / "new").touch()
    whiteout(etc / "hostname")
    (etc / "motd").write_text("hi\nx\n")
    assert lines(upper, lower) == ["C /etc", "D /etc/hostname", "C /etc/motd", "C /tmp", "A /tmp/new"]


def test_a_changed_file_alone_leaves_an_unchanged_parent_out(trees):
    """The parent directories of a changed (not added or deleted) file are in the upper directory
    only to hold it: with the lower's mode, size and mtime they are not listed, as in Docker."""
    upper, lower = trees
    doc = copy_up(upper, lower, "usr/share/doc/foo")
    (doc / "copyright").write_text("c2")
    settle(upper, lower)
    assert lines(upper, lower) == ["C /usr/share/doc/foo/copyright"]


def test_a_directory_whose_metadata_changed_is_listed(trees):
    upper, lower = trees
    doc = copy_up(upper, lower, "usr/share/doc/foo")
    (doc / "copyright").write_text("c2")
    settle(upper, lower)
    os.chmod(upper / "usr" / "share", 0o700)
    os.utime(upper / "usr", (MTIME + 5, MTIME + 5))
    assert lines(upper, lower) == ["C /usr", "C /usr/share", "C /usr/share/doc/foo/copyright"]


def test_mtimes_compare_to_the_second_when_one_side_has_no_nanoseconds(trees):
    upper, lower = trees
    copy_up(upper, lower, "usr/share/doc/foo")
    settle(upper, lower)
    os.utime(upper / "usr", ns=(MTIME * 10**9 + 5, MTIME * 10**9 + 5))  # lower: whole seconds
    assert lines(upper, lower) == []
    os.utime(lower / "usr", ns=(MTIME * 10**9 + 7, MTIME * 10**9 + 7))
    assert lines(upper, lower) == ["C /usr"]


def test_the_parent_of_an_added_entry_is_changed_even_if_it_looks_the_same(trees):
    upper, lower = trees
    lib = copy_up(upper, lower, "var/lib")
    (lib / "new").write_text("n")
    settle(upper, lower)
    assert lines(upper, lower) == ["C /var/lib", "A /var/lib/new"]  # /var, unchanged, is not


def test_an_added_directory_lists_everything_in_it(trees):
    upper, lower = trees
    (upper / "srv" / "app" / "sub").mkdir(parents=True)
    (upper / "srv" / "app" / "run.sh").write_text("x")
    (upper / "srv" / "app" / "link").symlink_to("/etc/passwd")
    assert lines(upper, lower) == ["A /srv", "A /srv/app", "A /srv/app/link", "A /srv/app/run.sh",
                                   "A /srv/app/sub"]


@needs_root
def test_a_deleted_directory_is_one_line(trees):
    upper, lower = trees
    etc = copy_up(upper, lower, "etc")
    settle(upper, lower)
    whiteout(etc / "apt")
    assert lines(upper, lower) == ["C /etc", "D /etc/apt"]


@needs_root
@pytest.mark.parametrize("xattr", ["trusted.overlay.opaque", "user.overlay.opaque"])
def test_an_opaque_directory_is_changed_and_hides_the_lower_one(trees, xattr):
    """rm -rf /etc/apt && mkdir -p /etc/apt/sources.list.d && touch /etc/apt/sources.list.d/y.list
    /etc/apt/new: what the lower /etc/apt held and the new one does not is deleted."""
    upper, lower = trees
    etc = copy_up(upper, lower, "etc")
    settle(upper, lower)
    apt = etc / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "y.list").touch()
    (apt / "new").touch()
    try:
        os.setxattr(apt, xattr, b"y")
    except OSError as exc:
        pytest.skip(f"this filesystem takes no {xattr}: {exc}")
    assert lines(upper, lower) == ["C /etc", "C /etc/apt", "A /etc/apt/new", "D /etc/apt/sources.list",
                                   "C /etc/apt/sources.list.d", "D /etc/apt/sources.list.d/x.list",
                                   "A /etc/apt/sources.list.d/y.list"]


def test_an_opaque_flag_other_than_y_is_not_opaque(trees):
    upper, lower = trees
    etc = copy_up(upper, lower, "etc/apt")
    settle(upper, lower)
    try:
        os.setxattr(etc, "user.overlay.opaque", b"n")
    except OSError as exc:
        pytest.skip(f"this filesystem takes no user xattrs: {exc}")
    assert lines(upper, lower) == []


def test_a_new_type_at_an_old_path_is_changed(trees):
    upper, lower = trees
    etc = copy_up(upper, lower, "etc")
    settle(upper, lower)
    (etc / "motd").mkdir()  # a directory where the lower holds a file (after rm, mkdir)
    (etc / "motd" / "inside").touch()
    (etc / "hostname").symlink_to("motd")
    assert lines(upper, lower) == ["C /etc", "C /etc/hostname", "C /etc/motd", "A /etc/motd/inside"]


def test_a_character_device_other_than_0_0_is_a_file(trees, tmp_path):
    upper, lower = trees
    if os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    os.mknod(upper / "null", 0o020666, os.makedev(1, 3))
    assert lines(upper, lower) == ["A /null"]


def test_symlinks_in_the_upper_directory_are_not_followed(trees, tmp_path):
    """A container may put links in its upper directory: the walk lists them, never their targets."""
    upper, lower = trees
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "secret").touch()
    (upper / "escape").symlink_to(tmp_path / "host")
    (upper / "root").symlink_to("/")
    assert lines(upper, lower) == ["A /escape", "A /root"]


def test_lines_are_in_dockers_walk_order(trees):
    """Component by component, as Docker walks: /a/x before /a-b and /a.b ('/' sorts after them
    as bytes)."""
    upper, lower = trees
    (upper / "a").mkdir()
    (upper / "a" / "x").touch()
    (upper / "a-b").touch()
    (upper / "a.b").touch()
    (upper / "B").touch()
    assert lines(upper, lower) == ["A /B", "A /a", "A /a/x", "A /a-b", "A /a.b"]


def test_a_missing_upper_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        changes(tmp_path / "gone", tmp_path)


@needs_root
def test_a_real_overlay_changed_through_its_merged_view(tmp_path, trees):
    """Whatever the kernel writes to the upper directory, read back as Docker would."""
    upper, lower = trees
    work, merged = tmp_path / "work", tmp_path / "merged"
    work.mkdir()
    merged.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if libc.mount(b"overlay", str(merged).encode(), b"overlay", 0, options) != 0:
        pytest.skip(f"overlayfs cannot be mounted here: {os.strerror(ctypes.get_errno())}")
    try:
        script = ("touch tmp/new && rm etc/hostname && echo x >> etc/motd && rm -rf etc/apt && "
                  "mkdir -p etc/apt/sources.list.d && touch etc/apt/sources.list.d/y.list && "
                  "echo y >> usr/share/doc/foo/copyright && mkdir -p srv/a && touch srv/a/b")
        subprocess.run(["sh", "-c", script], cwd=merged, check=True)
    finally:
        libc.umount2(str(merged).encode(), 0)
    # Directories copied up only to hold a changed file keep the lower's mode and mtime; their size
    # matches it on ext4 (4096), not on filesystems that count entries: there they are listed too.
    parents = [line for line in lines(upper, lower) if line in ("C /usr", "C /usr/share", "C /usr/share/doc",
                                                                 "C /usr/share/doc/foo")]
    result = [line for line in lines(upper, lower) if line not in parents]
    assert result[:7] == ["C /etc", "C /etc/apt", "D /etc/apt/sources.list", "C /etc/apt/sources.list.d",
                          "D /etc/apt/sources.list.d/x.list", "A /etc/apt/sources.list.d/y.list",
                          "D /etc/hostname"]
    assert result[7:] == ["C /etc/motd", "A /srv", "A /srv/a", "A /srv/a/b", "C /tmp", "A /tmp/new",
                          "C /usr/share/doc/foo/copyright"]
