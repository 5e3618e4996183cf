"""Several `kura serve` processes over one shared store, as a scaled-out deployment runs them.

All instances read ONE config file. Its storage part is whatever TOML the caller gives
(today `[storage] root = "..."`; for S3 the `[storage]`/`[storage.s3]` sections), the rest is
the same for every test: the access log on, no per-client connection cap (behind a balancer
every client has the balancer's address). Each instance gets only `--listen` of its own, on a
free port of 127.0.0.1, and keeps that port across restarts so a balancer's backend list
stays valid. `kill(i)` is a SIGKILL (no clean-up of any kind), `restart(i)` starts it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .lifetime import assert_main_thread, die_with_parent
from .paths import REPO
from .servers import free_port

COMMON_TOML = """
[server]
# Behind a balancer every connection comes from the balancer's address.
max_connections_per_client = 0

[log]
access_log = true
"""


@dataclass
class Instance:
    index: int
    port: int
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Instances:
    """N `kura serve` processes sharing `config_file`."""
    folder: Path
    config_file: Path
    instances: list[Instance] = field(default_factory=list)

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self):
        return iter(self.instances)

    @property
    def ports(self) -> list[int]:
        return [instance.port for instance in self.instances]

    def by_host(self, host: str) -> Instance:
        return next(instance for instance in self.instances if instance.host == host)

    def _spawn(self, instance: Instance) -> None:
        assert_main_thread("kura serve")
        with open(instance.log, "ab") as log:
            log.write(f"--- start {instance.starts + 1} of instance {instance.index}\n".encode())
            log.flush()
            instance.process = subprocess.Popen(
                [sys.executable, "-m", "kura", "serve", "--config", str(self.config_file),
                 "--listen", instance.host, "--workers", "1"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)
        instance.starts += 1

    def start_all(self) -> None:
        for instance in self.instances:  # all at once: they race on creating the store
            self._spawn(instance)
        for instance in self.instances:
            self._wait_serving(instance)

    def kill(self, index: int) -> None:
        """SIGKILL instance `index` and reap it."""
        instance = self.instances[index]
        assert instance.alive, f"instance {index} is not running"
        os.kill(instance.process.pid, signal.SIGKILL)
        assert instance.process.wait(timeout=10) == -signal.SIGKILL

    def restart(self, index: int) -> None:
        self.spawn(index)
        self.wait_serving(index)

    def spawn(self, index: int) -> None:
        """Start instance `index` again (from the main thread) without waiting for it."""
        instance = self.instances[index]
        assert not instance.alive, f"instance {index} is still running"
        self._spawn(instance)

    def wait_serving(self, index: int) -> None:
        """Until instance `index` answers (may run in another thread)."""
        self._wait_serving(self.instances[index])

    def stop_all(self) -> None:
        for instance in self.instances:
            if instance.alive:
                instance.process.terminate()
        for instance in self.instances:
            if instance.process is not None:
                try:
                    instance.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
                    instance.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for instance in self.instances:
            if instance.log.is_file():
                tail = instance.log.read_text(errors="replace").splitlines()[-lines:]
                out += [f"[k{instance.index}] {line}" for line in tail]
        return "\n".join(out)

    def fsck(self) -> subprocess.CompletedProcess:
        """`kura fsck --config` on the shared config: the store the instances serve, whatever it is."""
        return subprocess.run([sys.executable, "-m", "kura", "fsck", "--config", str(self.config_file)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    def _wait_serving(self, instance: Instance, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if instance.process.poll() is not None:
                raise RuntimeError(f"instance {instance.index} exited with {instance.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                urllib.request.urlopen(instance.url + "/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # answering (401 with auth on)
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"instance {instance.index} on {instance.url} not serving after {timeout}s")

    def __enter__(self) -> "Instances":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def start_instances(folder: Path, storage_toml: str, count: int = 3, extra_toml: str = "") -> Instances:
    """Write `folder/kura.toml` (the storage part as given, then `extra_toml`: sections other
    than [server] and [log]) and start `count` instances on it."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "kura.toml"
    config_file.write_text(storage_toml.strip() + "\n" + COMMON_TOML + extra_toml)
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    group = Instances(folder, config_file,
                      [Instance(i, port, folder / f"kura-{i}.log") for i, port in enumerate(sorted(ports))])
    try:
        group.start_all()
    except BaseException:
        group.stop_all()
        raise
    return group
