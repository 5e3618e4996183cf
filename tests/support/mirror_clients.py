"""Real clients pulling through a registry mirror, for end-to-end tests of a pull-through cache.

- podman and skopeo: a containers-registries.conf whose `[[registry]]` for a prefix (docker.io)
  has `[[registry.mirror]]` entries (`registries_conf`, `Podman`, `Skopeo`);
- dockerd: daemon.json `registry-mirrors` (`docker_daemon`, `docker_daemon_async`);
- containerd: `ctr images pull --hosts-dir` with a hosts.toml (`hosts_dir`, `containerd_daemon`,
  `containerd_daemon_async`), and the same requests made by hand (`containerd_style_get`).

Every command is a `Command`: `.run()` blocks, `await .run_async()` does not (for tests whose
event loop also serves the registry). Each tool keeps all its files in the work folder it is
given, and runs in tests/support/sandbox.py for the paths its configuration cannot move.

What the clients send to a mirror (measured with podman 4.3, skopeo 1.9, docker 20.10,
containerd 1.6) is written down in tests/test_e2e_mirror_clients.py, which pins it.
"""

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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .sandbox import sandboxed

# What containerd 1.6 sends when it resolves a tag (HEAD, then GET by digest with the media type
# the descriptor named, followed by ", */*").
CONTAINERD_MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "*/*",
])
CONTAINERD_USER_AGENT = "containerd/1.6.20~ds1"
# A unix socket's path must fit in sockaddr_un (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 100


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout: float = 300

    def run(self) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv, env=self.env, capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"took more than {self.timeout}s: {self.argv}") from None

    async def run_async(self) -> subprocess.CompletedProcess:
        process = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise TimeoutError(f"took more than {self.timeout}s: {self.argv}") from None
        return subprocess.CompletedProcess(self.argv, process.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))


def _toml(value: str) -> str:
    return json.dumps(value)  # a TOML basic string, for the paths and host names used here


# --- podman and skopeo --------------------------------------------------------------------------

def registries_conf(directory: Path, prefix: str, location: str, mirrors: list[str],
                    insecure: bool = True) -> Path:
    """A containers-registries.conf(5) where images named `prefix/...` are at `location` and are
    tried first at each of `mirrors` in turn ("host:port" or "host:port/namespace")."""
    directory.mkdir(parents=True, exist_ok=True)
    flag = "true" if insecure else "false"
    lines = ["[[registry]]", f"prefix = {_toml(prefix)}", f"location = {_toml(location)}", f"insecure = {flag}"]
    for mirror in mirrors:
        lines += ["", "[[registry.mirror]]", f"location = {_toml(mirror)}", f"insecure = {flag}"]
    path = directory / "registries.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def _containers_env(workdir: Path, registries: Path) -> dict[str, str]:
    """The environment of a podman or skopeo reading only `registries`, with its own temporary
    folder and an empty credentials file (REGISTRY_AUTH_FILE: write logins into it)."""
    # The drop-in folder under HOME replaces /etc/containers/registries.conf.d when it exists.
    (workdir / "home" / ".config" / "containers" / "registries.conf.d").mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    auth = workdir / "auth.json"
    if not auth.exists():  # podman fails if its credentials file is missing
        auth.write_text('{"auths": {}}\n')
    return dict(os.environ, HOME=str(workdir / "home"), CONTAINERS_REGISTRIES_CONF=str(registries),
                REGISTRY_AUTH_FILE=str(auth), TMPDIR=str(workdir / "tmp"))


class Podman:
    """Root podman with its storage, run state, locks, database and temporary files under
    `workdir`: nothing in /var/lib/containers, /run/libpod or /dev/shm, no journald events.
    The overlay driver, not vfs: vfs copies every layer below each new one (redis:7 pulled
    in 13-29 s with vfs, 8-16 s with overlay here)."""

    def __init__(self, workdir: Path, registries: Path, storage_driver: str = "overlay"):
        self.workdir = workdir
        for name in ("storage", "run", "libpod-tmp", "tmp", "networks", "sandbox"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        storage_conf = workdir / "storage.conf"
        storage_conf.write_text("\n".join([
            "[storage]", f"driver = {_toml(storage_driver)}",
            f"graphroot = {_toml(str(workdir / 'storage'))}", f"runroot = {_toml(str(workdir / 'run'))}"]) + "\n")
        containers_conf = workdir / "containers.conf"
        containers_conf.write_text("\n".join([
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "none"',
            'lock_type = "file"',  # not shared memory in /dev/shm
            f"tmp_dir = {_toml(str(workdir / 'libpod-tmp'))}",
            f"static_dir = {_toml(str(workdir / 'storage' / 'libpod'))}",
            f"volume_path = {_toml(str(workdir / 'storage' / 'volumes'))}",
            f"image_copy_tmp_dir = {_toml(str(workdir / 'tmp'))}",
            "[network]",
            f"network_config_dir = {_toml(str(workdir / 'networks'))}"]) + "\n")
        self.env = dict(_containers_env(workdir, registries), CONTAINERS_CONF=str(containers_conf),
                        CONTAINERS_STORAGE_CONF=str(storage_conf))

    def command(self, *args: str, timeout: float = 300) -> Command:
        return Command(sandboxed(["podman", *args], self.workdir / "sandbox"), self.env, timeout)

    def pull(self, reference: str) -> Command:
        return self.command("pull", "--quiet", reference)

    def image_digest(self, reference: str) -> Command:
        """Its stdout: the manifest digest podman stored for `reference`."""
        return self.command("image", "inspect", "--format", "{{.Digest}}", reference)


class Skopeo:
    def __init__(self, workdir: Path, registries: Path):
        self.workdir, self.registries = workdir, registries
        (workdir / "sandbox").mkdir(parents=True, exist_ok=True)
        self.env = _containers_env(workdir, registries)

    def command(self, *args: str, timeout: float = 300) -> Command:
        argv = ["skopeo", "--registries-conf", str(self.registries), *args]
        return Command(sandboxed(argv, self.workdir / "sandbox"), self.env, timeout)

    def copy(self, reference: str, layout: Path, tag: str) -> Command:
        """`docker://reference` into the OCI layout `layout` as `tag`."""
        return self.command("copy", "--quiet", "--preserve-digests", f"docker://{reference}", f"oci:{layout}:{tag}")

    def inspect(self, reference: str) -> Command:
        # Without --no-tags skopeo lists the tags at the prefix's own host (registry-1.docker.io
        # for docker.io), ignoring both location and mirrors.
        return self.command("inspect", "--no-tags", f"docker://{reference}")


# --- daemons: dockerd, containerd --------------------------------------------------------------

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
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.socket}")

    def argv(self) -> list[str]:
        return ["dockerd", "--config-file", str(self.config), "--data-root", str(self.workdir / "data"),
                "--exec-root", str(self.sockets), "--pidfile", str(self.workdir / "dockerd.pid"),
                "-H", f"unix://{self.socket}"]

    def ready(self) -> bool:
        return _http_ping(self.socket, "/_ping")

    def command(self, *args: str, timeout: float = 300) -> Command:
        return Command(["docker", "-H", f"unix://{self.socket}", *args], self.env, timeout)

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
            f"root = {_toml(str(workdir / 'root'))}",
            f"state = {_toml(str(self.sockets / 'state'))}",
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]", f"  address = {_toml(str(self.socket))}",
            "[ttrpc]", '  address = ""',
            "[debug]", '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]', f"  path = {_toml(str(workdir / 'opt'))}",
        ]) + "\n")

    def argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config)]

    def ready(self) -> bool:
        return _accepts(self.socket)

    def command(self, *args: str, timeout: float = 300) -> Command:
        argv = ["ctr", "--address", str(self.socket), *args]
        return Command(sandboxed(argv, self.workdir / "sandbox"), dict(os.environ), timeout)

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


def hosts_dir(directory: Path, registry: str, server: str, mirrors: list[str]) -> Path:
    """A containerd hosts directory (for --hosts-dir, or config_path of the CRI plugin) where
    `registry` (docker.io) is at `server` and is tried first at each of `mirrors` ("http://host:port",
    or "http://host:port/v2/<namespace>", a path containerd then uses as it is)."""
    (directory / registry).mkdir(parents=True, exist_ok=True)
    lines = [f"server = {_toml(server)}"]
    for mirror in mirrors:
        lines += ["", f"[host.{_toml(mirror)}]", '  capabilities = ["pull", "resolve"]']
        if mirror.split("://", 1)[-1].partition("/")[2]:
            lines.append("  override_path = true")
    (directory / registry / "hosts.toml").write_text("\n".join(lines) + "\n")
    return directory


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


# --- containerd's requests, by hand -----------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def containerd_style_get(mirror_url: str, name: str, reference: str, ns: str | None = "docker.io",
                               method: str = "GET", accept: str = CONTAINERD_MANIFEST_ACCEPT) -> Answer:
    """`GET /v2/<name>/manifests/<reference>?ns=<ns>` at `mirror_url`, as containerd asks a mirror
    for an image of registry `ns` (with `ns=None`, no query: as it asks the registry itself)."""
    url = f"{mirror_url.rstrip('/')}/v2/{name}/manifests/{reference}"
    params = {"ns": ns} if ns is not None else None
    headers = {"Accept": accept, "User-Agent": CONTAINERD_USER_AGENT}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, params=params, headers=headers, allow_redirects=False) as response:
            return Answer(response.status, dict(response.headers), await response.read())
