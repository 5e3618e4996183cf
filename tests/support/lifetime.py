"""Children that do not outlive the test run.

A fixture's teardown stops what it started, but a test run that is itself killed (a CI
time-out, SIGKILL) runs no teardown, and long-lived servers started in sessions of their own
would stay behind. `die_with_parent` (a Popen `preexec_fn`) asks Linux to send the child
SIGTERM when the thread that started it ends: start such children from the main thread only,
never from `asyncio.to_thread` or an executor, whose threads end early."""

from __future__ import annotations

import ctypes
import signal
import threading

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def assert_main_thread(what: str) -> None:
    assert threading.current_thread() is threading.main_thread(), (
        f"start {what} from the main thread: it is sent SIGTERM when its starting thread ends")
