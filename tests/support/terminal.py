"""Run the real `kura` client on a pseudo-terminal, as a person at a keyboard would: it is the
session's controlling terminal, so Ctrl-C (\\x03) becomes SIGINT and Ctrl-D (\\x04) end of input,
exactly as the line discipline delivers them."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

from .cli import client_env
from .paths import REPO

CTRL_C = b"\x03"
CTRL_D = b"\x04"


class Terminal:
    def __init__(self, home: Path, *args: str):
        env = client_env(home)
        self.output = b""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become `kura ARGS` at once
            try:
                os.chdir(REPO)
                os.execve(sys.executable, [sys.executable, "-m", "kura", *args], env)
            finally:
                os._exit(127)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False once the child closed the terminal."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: every process holding the terminal has gone
            return False
        self.output += data
        return bool(data)

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"{text!r} never appeared; the terminal shows {self.output!r}")

    def send(self, keys: bytes) -> None:
        """Type `keys` once the program waits for them, as a person answers a prompt they
        see: a Ctrl-C that lands between the prompt's write and the read would be a race
        in CPython's input() (the signal is noted, and the read then blocks)."""
        self._wait_until_blocked()
        os.write(self.fd, keys)

    def _wait_until_blocked(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                return  # gone: nothing waits for input any more
            if state == "S":
                return
            time.sleep(0.01)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """The exit code and everything the terminal showed (\\r\\n as the terminal writes it)."""
        deadline = time.monotonic() + timeout
        while self._read(0.1):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                break
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), self.output.decode(errors="replace")
