"""Start writing a file's new bytes to disk while more arrive (Linux sync_file_range).

A blob is fsynced before it is stored; without this, all of it is still dirty in the page cache
by then, and the fsync writes all of it while the client waits for its answer. Asking the kernel
to start writeback of each batch as it is written (SYNC_FILE_RANGE_WRITE does not wait) leaves
the fsync little to do. Nothing depends on it for safety: the fsync is still what makes the
blob durable. Where the call is missing it does nothing."""

from __future__ import annotations

import ctypes
import sys

SYNC_FILE_RANGE_WRITE = 2


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing bytes [offset, offset + length) of `fd` to disk. Errors
    are ignored: the fsync that follows reports what matters."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
