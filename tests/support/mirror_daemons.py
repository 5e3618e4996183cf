"""Private dockerd and containerd daemons for the mirror-client tests (see mirror_clients.py):
each in the sandbox (sandbox.py), its files under the work folder it is given, started and
stopped with or without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .mirror_clients import Command, toml_string
from .sandbox import sandboxed

# A unix socket's path must fit in sockaddr_un (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 100


def _socket_dir(workdir: Path, name: str) -> tuple[Path, bool]:
    """Where a daemon's unix sockets go: in `workdir` if the path is short enough, else in a
    short temporary folder, made at start and removed at stop (the second value: whether so)."""
    wanted = workdir / "sock"
    if len(str(wanted / "containerd" / "containerd-debug.sock")) <= _MAX_SOCKET_PATH:
        return wanted, False
    return Path(tempfile.gettempdir()) / f"kura-{name}-{uuid.uuid4().hex[:12]}", True


def _http_ping(socket_path: Path, path: str) -> bool:
    """A daemon's unix socket answers GET `path` with 200."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(str(socket_path))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: daemon\r\n\r\n".encode())
            return s.recv(64).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
        except OSError:
            return False


def _accepts(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(socket_path))
            return True
        except OSError:
            return False


class Daemon:
    """A daemon in the sandbox, logging to `workdir/<name>.log`; `ready()` says it answers."""

    name = "daemon"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.sockets, self._remove_sockets = _socket_dir(workdir, self.name)
        self.log = workdir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.started_in: float | None = None  # seconds from start to ready

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _launch(self) -> float:
        (self.workdir / "sandbox").mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(sandboxed(self.argv(), self.workdir / "sandbox"), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return time.monotonic()

    def _check(self, began: float, timeout: float) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
        if self.ready():
            self.started_in = time.monotonic() - began
            return True
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{self.name} not ready after {timeout}s: {self.log_tail()}")
        return False

    def start(self, timeout: float = 60) -> None:
        began = self._launch()
        while not self._check(began, timeout):
            time.sleep(0.05)

    async def start_async(self, timeout: float = 60) -> None:
        began = self._launch()
        while not self._check(began, timeout):
            await asyncio.sleep(0.05)

    def _signal_stop(self) -> float:
        if self.process.poll() is None:
            self.process.terminate()
        return time.monotonic()

    def _stopped(self, began: float, timeout: float) -> bool:
        if self.process.poll() is not None:
            return True
        if time.monotonic() - began > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # dockerd's containerd too
            self.process.wait()  # their mounts go with their mount namespace
            return True
        return False

    def _cleanup(self) -> None:
        if self._remove_sockets:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def stop(self, timeout: float = 30) -> None:
        if self.process is not None:
            began = self._signal_stop()
            while not self._stopped(began, timeout):
                time.sleep(0.05)
        self._cleanup()

    async def stop_async(self, timeout: float = 30) -> None:
        if self.process is not None:
            began = self._signal_stop()
            while not self._stopped(began, timeout):
                await asyncio.sleep(0.05)
        self._cleanup()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class DockerDaemon(Daemon):
    """A private dockerd (and the containerd it starts): no iptables, no bridge, its own data
    root, exec root, pidfile, socket and key; `mirrors` are its registry-mirrors (root URLs:
    docker refuses a path)."""

    name = "dockerd"

    def __init__(self, workdir: Path, mirrors: list[str], insecure_registries: list[str] | None = None):
        super().__init__(workdir)
        self.socket = self.sockets / "docker.sock"
        self.config = workdir / "daemon.json"
        hosts = [m.split("://", 1)[-1].rstrip("/") for m in mirrors]
        self.config.write_text(json.dumps({
            "iptables": False, "ip6tables": False, "ip-forward": False, "ip-masq": False, "bridge": "none",
            "registry-mirrors": mirrors,
            "insecure-registries": insecure_registries if insecure_registries is not None else hosts,
            # The daemon's identity key, /etc/docker/key.json by default (no flag for it).
            "deprecated-key-path": str(workdir / "key.json"),
        }, indent=2))

    def argv(self) -> list[str]:
        return ["dockerd", "--config-file", str(self.config), "--data-root", str(self.workdir / "data"),
                "--exec-root", str(self.sockets), "--pidfile", str(self.workdir / "dockerd.pid"),
                "-H", f"unix://{self.socket}"]

    def ready(self) -> bool:
        return _http_ping(self.socket, "/_ping")

    def command(self, *args: str, timeout: float = 300) -> Command:
        return Command(["docker", "-H", f"unix://{self.socket}", *args], timeout=timeout)

    def pull(self, reference: str) -> Command:
        return self.command("pull", "--quiet", reference)

    def image_digest(self, reference: str) -> Command:
        """Its stdout: the manifest digest docker recorded for `reference` (pulled by tag)."""
        return self.command("image", "inspect", "--format", '{{index (split (index .RepoDigests 0) "@") 1}}',
                            reference)


class ContainerdDaemon(Daemon):
    """A private containerd: its root, state, opt folder and socket in `workdir`, no CRI plugin."""

    name = "containerd"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.socket = self.sockets / "containerd.sock"
        self.config = workdir / "containerd.toml"
        disabled = ["io.containerd.grpc.v1.cri"] + [f"io.containerd.snapshotter.v1.{s}"
                                                    for s in ("aufs", "btrfs", "devmapper", "zfs")]
        self.config.write_text("\n".join([
            "version = 2",
            f"root = {toml_string(str(workdir / 'root'))}",
            f"state = {toml_string(str(self.sockets / 'state'))}",
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]", f"  address = {toml_string(str(self.socket))}",
            "[ttrpc]", '  address = ""',
            "[debug]", '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]', f"  path = {toml_string(str(workdir / 'opt'))}",
        ]) + "\n")

    def argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config)]

    def ready(self) -> bool:
        return _accepts(self.socket)

    def command(self, *args: str, timeout: float = 300) -> Command:
        argv = ["ctr", "--address", str(self.socket), *args]
        return Command(sandboxed(argv, self.workdir / "sandbox"), timeout=timeout)

    def pull(self, reference: str, hosts: Path) -> Command:
        """`ctr images pull` of a fully qualified `reference`, with registry hosts from `hosts`
        (see `hosts_dir`); it fetches and unpacks."""
        return self.command("images", "pull", "--hosts-dir", str(hosts), reference)

    def images(self) -> Command:
        return self.command("images", "list")


def listed_digest(ctr_images_list: str, reference: str) -> str:
    """The digest `ctr images list` shows for `reference`."""
    for line in ctr_images_list.splitlines()[1:]:
        columns = line.split()
        if columns and columns[0] == reference:
            return columns[2]
    raise LookupError(f"{reference} not in:\n{ctr_images_list}")


@contextlib.contextmanager
def _running(daemon: Daemon):
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@contextlib.asynccontextmanager
async def _running_async(daemon: Daemon):
    try:
        await daemon.start_async()
        yield daemon
    finally:
        await daemon.stop_async()


def docker_daemon(workdir: Path, mirrors: list[str], insecure_registries: list[str] | None = None):
    """`with docker_daemon(tmp_path / "docker", ["http://127.0.0.1:PORT"]) as docker: ...`"""
    return _running(DockerDaemon(workdir, mirrors, insecure_registries))


def docker_daemon_async(workdir: Path, mirrors: list[str], insecure_registries: list[str] | None = None):
    """`async with docker_daemon_async(...) as docker: ...`, without blocking the event loop."""
    return _running_async(DockerDaemon(workdir, mirrors, insecure_registries))


def containerd_daemon(workdir: Path):
    return _running(ContainerdDaemon(workdir))


def containerd_daemon_async(workdir: Path):
    return _running_async(ContainerdDaemon(workdir))
