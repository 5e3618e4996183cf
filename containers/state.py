"""Where containers live and what is recorded of them.

    <store>/containers/<id>/state.json   the record (written atomically: temp, fsync, rename)
    <store>/containers/<id>/config.json  the OCI runtime config (the directory is runc's bundle)
    <store>/containers/<id>/rootfs/      the overlay mount (or the private copy)
    <store>/containers/<id>/upper/, work/  the overlay's writable layer and its scratch
    <store>/containers/<id>/log          stdout and stderr of a detached container
    <store>/containers/runc/             runc's state (`runc --root`), never the system's
    <store>/containers/lowers/<hex>/     an image's layers unpacked once, shared read-only

The record says what its writer last knew; `current()` checks runc and the supervising process,
so a container whose process died reads as exited even when nobody could record it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
ID = re.compile(r"[0-9a-f]{64}")


class ContainerError(ValueError):
    pass


def private_directory(path: Path) -> None:
    """`path` made if missing, and reachable by root alone: the image files below it keep their
    setuid bits, device nodes and modes, which must never be within reach of other host users."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def _gone_is_fine(function, path, excinfo) -> None:
    if not isinstance(excinfo[1], FileNotFoundError):
        raise excinfo[1]


class Containers:
    def __init__(self, store_root: Path):
        self.root = Path(store_root).resolve() / "containers"
        self.runc_root = self.root / "runc"
        self.lowers = self.root / "lowers"

    def directory(self, cid: str) -> Path:
        if not ID.fullmatch(cid):
            raise ContainerError(f"invalid container id {cid!r}")
        return self.root / cid

    @contextlib.contextmanager
    def locked(self):
        """Exclusive while a name is claimed or a container removed."""
        private_directory(self.root)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if ID.fullmatch(p.name) and (p / "state.json").exists())

    def read(self, cid: str) -> dict:
        try:
            return json.loads((self.directory(cid) / "state.json").read_text())
        except (FileNotFoundError, ValueError) as exc:
            raise ContainerError(f"container {cid[:12]} has no readable state: {exc}") from None

    def write(self, record: dict) -> None:
        directory = self.directory(record["id"])
        tmp = directory / f"state.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / "state.json")

    def update(self, cid: str, **changes) -> dict:
        record = {**self.read(cid), **changes}
        self.write(record)
        return record

    def all(self) -> list[dict]:
        records = []
        for cid in self.ids():
            with contextlib.suppress(ContainerError):
                records.append(self.read(cid))
        return records

    def find(self, name_or_id: str) -> dict:
        """A container by name, full id, or a prefix of exactly one id."""
        records = self.all()
        for record in records:
            if name_or_id in (record["name"], record["id"]):
                return record
        matches = [r for r in records if name_or_id and r["id"].startswith(name_or_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ContainerError(f"{name_or_id!r} is the start of more than one container id; give more of it")
        raise ContainerError(f"no container {name_or_id!r} (kura ps -a lists them)")

    def create(self, record: dict) -> dict:
        """Claim a new id and the record's name (given, or made from the id); writes the record."""
        with self.locked():
            taken = {r["name"] for r in self.all()}
            name = record.get("name")
            if name:
                if not NAME.fullmatch(name):
                    raise ContainerError(f"invalid name {name!r}: letters, digits, '_', '.', '-' (not first)")
                if name in taken:
                    raise ContainerError(f"the name {name!r} is already in use (kura rm {name} to free it)")
            while True:
                cid = secrets.token_hex(32)
                if not (self.root / cid).exists() and cid[:12] not in taken:
                    break
            record = {**record, "id": cid, "name": name or cid[:12]}
            self.directory(cid).mkdir(parents=True)
            self.write(record)
        return record

    def remove_directory(self, cid: str) -> None:
        directory = self.directory(cid)
        rootfs = directory / "rootfs"
        if os.path.ismount(rootfs):
            raise ContainerError(f"{rootfs} is still mounted; not removing the container's files")
        # Another remover (the supervisor of a --rm container, a second `kura rm`) may be at it too.
        shutil.rmtree(directory, onerror=_gone_is_fine)


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat), or None when there is none:
    together with the pid it names one process, never a later one that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, OSError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def alive(pid: int | None, start: str | None) -> bool:
    return bool(pid) and process_start(pid) == start


def me() -> dict:
    """The supervisor fields for this process."""
    return {"supervisor": os.getpid(), "supervisor_start": process_start(os.getpid())}


def now() -> float:
    return time.time()
