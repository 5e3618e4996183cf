"""runc, with Kura's own state directory (`runc --root <store>/containers/runc`), and the
supervision of one container: run it, record when it started and how it ended, unmount its
root filesystem afterwards. A foreground `kura run` supervises its container itself; a
detached one starts `python -m containers.supervise` in a session of its own for that."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .rootfs import unmount
from .state import ContainerError, Containers, alive, me, now


def runc() -> str:
    path = shutil.which("runc")
    if path is None:
        raise ContainerError("runc is not installed (apt-get install runc)")
    return path


def runc_state(containers: Containers, cid: str) -> dict | None:
    """runc's view of a container (status created/running/paused/stopped), None when it has none."""
    if not (containers.runc_root / cid).exists():
        return None
    result = subprocess.run([runc(), "--root", str(containers.runc_root), "state", cid],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def runc_kill(containers: Containers, cid: str, sig: str) -> None:
    subprocess.run([runc(), "--root", str(containers.runc_root), "kill", cid, sig], capture_output=True)


def runc_delete(containers: Containers, cid: str) -> None:
    if (containers.runc_root / cid).exists():
        subprocess.run([runc(), "--root", str(containers.runc_root), "delete", "--force", cid],
                       capture_output=True)


def current(containers: Containers, record: dict) -> dict:
    """The record with "status" as it is now: a container whose supervisor is gone and that runc
    does not run any more is exited, with the code that was recorded (None if none was)."""
    if record.get("status") == "exited":
        return record
    state = runc_state(containers, record["id"])
    if state is not None and state.get("status") in ("created", "running", "paused"):
        return {**record, "status": "running"}
    deadline = time.monotonic() + 2
    while alive(record.get("supervisor"), record.get("supervisor_start")) and record.get("status") != "exited":
        if record.get("status") == "created" or time.monotonic() > deadline:
            return record  # not started yet (or its supervisor is stuck): as recorded
        time.sleep(0.02)  # between runc's end and the record of it
        record = containers.read(record["id"])
    return {**record, "status": "exited", "exit_code": record.get("exit_code")}


def supervise(containers: Containers, cid: str, *, stdin=None, stdout=None, stderr=None,
              forward_signals: bool = False) -> int:
    """Run the container to its end; returns its exit code (a signal n as 128+n)."""
    directory = containers.directory(cid)
    pid_file = directory / "pid"
    pid_file.unlink(missing_ok=True)
    containers.runc_root.mkdir(parents=True, exist_ok=True)
    containers.update(cid, **me())
    process = subprocess.Popen([runc(), "--root", str(containers.runc_root), "run", "--bundle", str(directory),
                                "--pid-file", str(pid_file), cid],
                               stdin=stdin, stdout=stdout, stderr=stderr)
    previous = {}
    if forward_signals:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            previous[sig] = signal.signal(sig, lambda n, _f: process.send_signal(n))
        # Ctrl-C reaches runc from the terminal too (one process group); runc passes it on.
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pid = _wait_for_pid(pid_file, process)
        containers.update(cid, status="running", pid=pid, started=now())
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = 128 - code if code < 0 else code
    finish(containers, cid, code)
    return code


def _wait_for_pid(pid_file: Path, process: subprocess.Popen) -> int | None:
    while True:
        try:
            return int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            if process.poll() is not None:
                return None
            time.sleep(0.005)


def finish(containers: Containers, cid: str, code: int) -> None:
    runc_delete(containers, cid)
    unmount(containers.directory(cid) / "rootfs")
    record = containers.update(cid, status="exited", exit_code=code, finished=now())
    if record.get("auto_remove"):
        remove(containers, record)


def remove(containers: Containers, record: dict) -> None:
    from puller.store import Store
    cid = record["id"]
    runc_delete(containers, cid)
    unmount(containers.directory(cid) / "rootfs")
    with containers.locked():
        containers.remove_directory(cid)
    store = Store(containers.root.parent)
    store.release(cid)
    from .lowers import prune
    prune(store, containers.lowers)


def stop(containers: Containers, record: dict, timeout: float) -> dict:
    """SIGTERM, SIGKILL after `timeout` seconds; returns the record once it is exited."""
    cid = record["id"]
    if current(containers, record)["status"] != "running":
        return current(containers, record)
    runc_kill(containers, cid, "TERM")
    if not _wait_exited(containers, cid, timeout):
        runc_kill(containers, cid, "KILL")
        _wait_exited(containers, cid, 30)
    return current(containers, containers.read(cid))


def _wait_exited(containers: Containers, cid: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        record = containers.read(cid)
        state = runc_state(containers, cid)
        running = state is not None and state.get("status") in ("created", "running", "paused")
        if not running and (record.get("status") == "exited" or
                            not alive(record.get("supervisor"), record.get("supervisor_start"))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
