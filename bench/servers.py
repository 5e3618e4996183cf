"""The registries under test, each on a free loopback port with fresh storage: Kura as a user
starts it (`kura serve`, its default workers, access log off) and the reference registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.support.paths import REPO
from tests.support.servers import free_port, start_distribution, stop_distribution, wait_for_challenge

MIB = 1 << 20


@dataclass
class Running:
    """A registry under test: where clients reach it, how to find its processes, how to stop it."""
    name: str
    host: str
    processes: Callable[[], list[int]]  # the pids that serve requests (a supervisor's workers)
    stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def peak_rss(self) -> int:
        """The largest peak resident set of one serving process, in bytes."""
        return max((peak_rss(pid) for pid in self.processes()), default=0)


def peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []


def start_kura(workdir: Path, *, workers: int | None = None, extra_config: str = "") -> Running:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "kura.toml"
    config.write_text("[log]\naccess_log = false\n" + extra_config)
    port = free_port()
    command = [sys.executable, "-m", "kura", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
               "--root", str(workdir / "data")]
    if workers is not None:
        command += ["--workers", str(workers)]
    log = open(workdir / "kura.log", "ab")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    wait_for_challenge(f"http://127.0.0.1:{port}/v2/", process)

    def processes() -> list[int]:
        return children(process.pid) or [process.pid]

    return Running("kura", f"127.0.0.1:{port}", processes, lambda: terminate(process))


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 20 s: a server started for the benchmark stopped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_reference(workdir: Path) -> Running:
    server = start_distribution(workdir)
    pid = server.process.pid if server.process is not None else int((workdir / "registry.pid").read_text())
    return Running("distribution", server.host, lambda: [pid], lambda: stop_distribution(server))


def cores() -> int:
    return len(os.sched_getaffinity(0))
