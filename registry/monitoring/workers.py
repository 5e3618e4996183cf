"""Metrics of `kura serve --workers N` add up over the workers: prometheus_client's
multiprocess mode, where each process writes its values to files of its own in one directory
and a scrape (answered by any worker) sums them.

The supervisor makes that directory (private, in the system's temp directory) and names it
in PROMETHEUS_MULTIPROC_DIR before the application, and so prometheus_client, is loaded: the
library chooses its mode once, on import. It tells the library of every worker that exits
(so the gauges of a dead worker stop counting; its counters stay, as counters must), and
removes the directory when it exits. One process (`--workers 1`) keeps its values in memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def shared_directory():
    path = tempfile.mkdtemp(prefix="kura-metrics-")  # mode 0700
    previous = os.environ.get(ENV)
    os.environ[ENV] = path
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def single_process() -> None:
    """One process: its values in memory, whatever the environment says."""
    os.environ.pop(ENV, None)


def directory() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def worker_exited(pid: int) -> None:
    """Drop what only a live worker may count (gauges of the `live…` modes)."""
    if ENV in os.environ and "prometheus_client" in sys.modules:  # else no worker kept metrics
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)
