"""Run the `kura` command as a child process from an async test (whose event loop serves the
in-process registries the command talks to)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from .paths import REPO


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def start_kura(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "kura", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_kura(*args: str, timeout: float = 120) -> Ran:
    process = await start_kura(*args)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return Ran(process.returncode, out.decode(), err.decode())
