"""The directories kept open between an unpack's entries (puller/dirchain.py)."""

from __future__ import annotations

import os
import shutil

import pytest

from puller.dirchain import MAX_DEPTH, DirectoryChain


@pytest.fixture
def chain(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    chain = DirectoryChain(fd)
    yield chain, root
    chain.clear()
    os.close(fd)


def inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_makes_missing_directories_and_hands_out_its_own_descriptor(chain):
    chain, root = chain
    assert inode(chain.open(["a", "b", "c"], create=True)) == os.stat(root / "a" / "b" / "c").st_ino
    assert inode(chain.open(["a", "b"], create=False)) == os.stat(root / "a" / "b").st_ino
    assert inode(chain.open(["a", "x"], create=True)) == os.stat(root / "a" / "x").st_ino
    assert inode(chain.open([], create=False)) == os.stat(root).st_ino
    with pytest.raises(FileNotFoundError):
        chain.open(["a", "missing"], create=False)


def test_holds_only_the_last_path(chain):
    chain, root = chain
    before = open_fds()
    for i in range(50):
        os.close(chain.open(["top", f"d{i}", "sub"], create=True))
    assert open_fds() - before == 3
    chain.clear()
    assert open_fds() == before


def test_symlinks_and_files_on_the_way_are_left_to_the_caller(chain, tmp_path):
    chain, root = chain
    (root / "real").mkdir()
    (root / "link").symlink_to(tmp_path)
    (root / "file").write_text("")
    assert chain.open(["link"], create=True) is None
    assert chain.open(["file", "x"], create=True) is None
    assert not (tmp_path / "x").exists() and sorted(os.listdir(root)) == ["file", "link", "real"]


def test_a_directory_replaced_after_clear_is_looked_up_again(chain, tmp_path):
    chain, root = chain
    os.close(chain.open(["a", "b"], create=True))
    shutil.rmtree(root / "a")
    chain.clear()  # what Root.remove does before removing a directory
    (root / "a").symlink_to(tmp_path)
    assert chain.open(["a", "b"], create=True) is None
    assert not (tmp_path / "b").exists()


def test_paths_deeper_than_the_bound_are_not_kept(chain):
    chain, root = chain
    assert chain.open(["d"] * (MAX_DEPTH + 1), create=True) is None
    assert not (root / "d").exists()
