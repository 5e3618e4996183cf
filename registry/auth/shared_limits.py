"""The failed-login limits of ratelimit.py across the workers of one `kura serve --workers N`.

Each worker would otherwise count only the guesses it saw, and a client that spreads its
guesses over new connections (the kernel hands each to any worker) would get N times the
tries. Here the failures and the checks in progress live in one SQLite file that the
supervisor creates (in the system's temp directory) and removes; every change is a small
transaction, and the supervisor drops the checks of a worker that died. The rules are
LoginLimiter's; an attempt that must wait for running checks polls instead of awaiting an
event (they may run in another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from .ratelimit import Client, LoginLimiter, client_bucket

POLL_SECONDS = 0.05
MAX_FAILURES = 300_000  # rows (a failure counts under up to 3 keys): bounds the file under a spray
LOCK_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_by_key ON failures (key, t);
CREATE INDEX IF NOT EXISTS failures_by_time ON failures (t);
CREATE TABLE IF NOT EXISTS checking (key TEXT NOT NULL, pid INTEGER NOT NULL, n INTEGER NOT NULL,
                                     PRIMARY KEY (key, pid));
"""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = OFF")  # counts of the last minutes: not worth an fsync
    db.execute("PRAGMA journal_mode = MEMORY")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class LoginTable:
    """The shared file: made by the supervisor, used by its workers (each opens its own
    connection, after the fork)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="kura-logins-", suffix=".sqlite")
        os.close(fd)
        self.path = Path(name)
        with contextlib.closing(_connect(self.path)) as db:
            db.executescript(_SCHEMA)

    def forget(self, pid: int) -> None:
        """The checks that worker `pid` had in progress when it died hold no tries any more."""
        with contextlib.closing(_connect(self.path)) as db, _transaction(db):
            db.execute("DELETE FROM checking WHERE pid = ?", (pid,))

    def remove(self) -> None:
        for path in (self.path, self.path.with_name(self.path.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class SharedLoginLimiter(LoginLimiter):
    def __init__(self, attempts: int, window_seconds: int, table: LoginTable):
        super().__init__(attempts, window_seconds)
        self.table = table
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            self._db, self._pid = _connect(self.table.path), os.getpid()
        return self._db

    def _shared_keys(self, client: Client, user: str) -> list[tuple[str, int]]:
        return [(json.dumps(key), limit) for key, limit in self._keys(client, user)]

    async def begin(self, client: Client, user: str) -> int:
        keys = self._shared_keys(client, user)
        while True:
            now = time.monotonic()
            wait, busy = 0, False
            with _transaction(self._connection()) as db:
                for key, limit in keys:
                    count, oldest = db.execute("SELECT count(*), min(t) FROM failures WHERE key = ? AND t > ?",
                                               (key, now - self.window)).fetchone()
                    if count >= limit:
                        wait = max(wait, int(oldest + self.window - now) + 1)
                        continue
                    checking, = db.execute("SELECT coalesce(sum(n), 0) FROM checking WHERE key = ?",
                                           (key,)).fetchone()
                    if count + checking >= limit:
                        busy = True
                if not wait and not busy:
                    db.executemany("INSERT INTO checking (key, pid, n) VALUES (?, ?, 1) "
                                   "ON CONFLICT (key, pid) DO UPDATE SET n = n + 1",
                                   [(key, self._pid) for key, _ in keys])
            if wait:
                return wait
            if not busy:
                return 0
            await asyncio.sleep(POLL_SECONDS)

    def end(self, client: Client, user: str, right: bool | None) -> None:
        keys = self._shared_keys(client, user)
        now = time.monotonic()
        with _transaction(self._connection()) as db:
            for key, _ in keys:
                db.execute("UPDATE checking SET n = n - 1 WHERE key = ? AND pid = ?", (key, self._pid))
                if right is False:
                    db.execute("INSERT INTO failures (key, t) VALUES (?, ?)", (key, now))
            db.execute("DELETE FROM checking WHERE n <= 0")
            if right:
                pair = json.dumps(("pair", client_bucket(client.address), user))
                db.execute("DELETE FROM failures WHERE key = ?", (pair,))
            db.execute("DELETE FROM failures WHERE t <= ?", (now - self.window,))
            # Rows are numbered in the order they came: keep the newest MAX_FAILURES numbers.
            db.execute("DELETE FROM failures WHERE rowid <= (SELECT max(rowid) FROM failures) - ?", (MAX_FAILURES,))


def share(app, table: LoginTable) -> None:
    """Make the app (not started yet) count failed logins in `table`."""
    from .controller import AUTH

    credentials = app[AUTH].credentials
    if credentials is not None:
        limiter = credentials.limiter
        credentials.limiter = SharedLoginLimiter(limiter.attempts, limiter.window, table)
