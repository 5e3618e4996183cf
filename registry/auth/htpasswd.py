"""Accounts in an Apache htpasswd file with bcrypt entries (`htpasswd -B` compatible).

bcrypt is the only accepted hash: it is deliberately slow, so checks run in a small pool
of their own (never the event loop, never the threads storage uses), with a bound on how
many may wait. Unknown users are checked against a dummy hash as costly as the costliest
entry, so timing does not tell which user names exist. The file is re-read when it
changes, so `kura user add` takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

log = logging.getLogger("kura.auth")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
DEFAULT_COST = 10
CHECK_THREADS = 2
MAX_PENDING_CHECKS = 32
_BCRYPT_MAX_BYTES = 72


class LoginsBusy(Exception):
    """More password checks are waiting than the pool should queue."""


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


class HtpasswdError(ValueError):
    pass


def valid_user_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def parse(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not _BCRYPT.fullmatch(hashed):
            log.warning("%s:%d: skipped (only bcrypt entries are accepted)", source, number)
            continue
        users[name] = hashed.encode()
    return users


class Htpasswd:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._dummies: dict[int, bytes] = {}
        self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="bcrypt")
        self._pending = 0

    def users(self) -> dict[str, bytes]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return self._users
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._users = parse(self.path.read_text(), str(self.path))
            self._stamp = stamp
        return self._users

    def exists(self, name: str) -> bool:
        return name in self.users()

    def _dummy(self) -> bytes:
        cost = max((_cost(h) for h in self.users().values()), default=DEFAULT_COST)
        if cost not in self._dummies:
            self._dummies[cost] = bcrypt.hashpw(b"kura-dummy-password", bcrypt.gensalt(cost))
        return self._dummies[cost]

    async def check(self, name: str, password: str) -> bool:
        hashed = self.users().get(name)
        candidate = password.encode()
        if len(candidate) > _BCRYPT_MAX_BYTES:  # bcrypt cannot have set it; spend the same time anyway
            hashed, candidate = None, candidate[:_BCRYPT_MAX_BYTES]
        if self._pending >= MAX_PENDING_CHECKS:
            raise LoginsBusy()
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._pool, bcrypt.checkpw, candidate, hashed or self._dummy())
        finally:
            self._pending -= 1
        return ok and hashed is not None

    def fingerprint(self, name: str) -> str | None:
        """A short value that changes whenever the user's password does (None: no such user)."""
        hashed = self.users().get(name)
        return hashlib.sha256(hashed).hexdigest()[:16] if hashed else None


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    if not password:
        raise HtpasswdError("the password must not be empty")
    if len(password.encode()) > 72:
        raise HtpasswdError("bcrypt uses at most 72 bytes of a password; choose a shorter one")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def set_user(path: Path, name: str, password: str, cost: int = DEFAULT_COST) -> bool:
    """Add or replace a user; returns True when the user existed. Atomic, mode 0600."""
    if not valid_user_name(name):
        raise HtpasswdError(f"invalid user name {name!r}")
    lines, existed = _lines_without(path, name)
    lines.append(f"{name}:{hash_password(password, cost)}")
    _write(path, lines)
    return existed


def list_users(path: Path) -> list[str]:
    """User names in file order (entries that are not bcrypt are skipped, with a warning)."""
    try:
        return list(parse(path.read_text(), str(path)))
    except FileNotFoundError:
        return []


def remove_user(path: Path, name: str) -> bool:
    lines, existed = _lines_without(path, name)
    if existed:
        _write(path, lines)
    return existed


def _lines_without(path: Path, name: str) -> tuple[list[str], bool]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], False
    kept = [line for line in lines if line.partition(":")[0] != name]
    return kept, len(kept) != len(lines)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
