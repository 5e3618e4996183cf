"""Run the real `kura` client as a child process from async tests (so an in-process aiohttp
registry keeps answering meanwhile): with its own home, store and Docker config (`kura`), or
in the test's isolated environment (`run_kura`, `start_kura`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .paths import REPO


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int | None = None  # bytes, when measured


def client_env(home: Path) -> dict[str, str]:
    """Nothing from the user running the tests: no logins, no registries.conf, no store."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "CONTAINERS_REGISTRIES_CONF", "XDG_DATA_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               DOCKER_CONFIG=str(home / "docker"))
    return env


async def kura(home: Path, *args: str, stdin: bytes | None = None, measure: bool = False,
               timeout: float = 120) -> Ran:
    """`python -m kura ARGS`; with `measure`, its peak RSS too (see tests/support/peak_rss.py)."""
    command = [sys.executable, "-m", "kura", *args]
    report = home / "peak-rss"
    if measure:
        command = [sys.executable, "-m", "tests.support.peak_rss", str(report), *command]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, env=client_env(home), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin or b""), timeout)
    except asyncio.TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)  # the measuring wrapper's child too
        await process.wait()
        raise
    peak = int(report.read_text()) if measure else None
    return Ran(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), peak)


def one_line_error(ran: Ran) -> str:
    """The failure a user sees: non-zero exit and exactly one `kura: ...` line, no traceback."""
    assert ran.returncode != 0, (ran.stdout, ran.stderr)
    assert "Traceback" not in ran.stderr, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kura: "), ran.stderr
    return lines[0]


async def start_kura(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "kura", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_kura(*args: str, timeout: float = 120) -> Ran:
    process = await start_kura(*args)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()  # not left running after the test gave up on it
        await process.wait()
        raise
    return Ran(process.returncode, out.decode(), err.decode())
