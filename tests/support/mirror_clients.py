"""Real clients pulling through a registry mirror, for end-to-end tests of a pull-through cache.

- podman and skopeo: a containers-registries.conf whose `[[registry]]` for a prefix (docker.io)
  has `[[registry.mirror]]` entries (`registries_conf`, `Podman`, `Skopeo`);
- dockerd: daemon.json `registry-mirrors` (mirror_daemons.py: `docker_daemon`, `docker_daemon_async`);
- containerd: `ctr images pull --hosts-dir` with a hosts.toml (`hosts_dir`; mirror_daemons.py:
  `containerd_daemon`, `containerd_daemon_async`), and its requests made by hand (`containerd_style_get`).

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
import signal
import subprocess
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


def toml_string(value: str) -> str:
    """`value` as a TOML basic string (for the paths and host names written here)."""
    return json.dumps(value)


# --- podman and skopeo --------------------------------------------------------------------------

def registries_conf(directory: Path, prefix: str, location: str, mirrors: list[str],
                    insecure: bool = True) -> Path:
    """A containers-registries.conf(5) where images named `prefix/...` are at `location` and are
    tried first at each of `mirrors` in turn ("host:port" or "host:port/namespace")."""
    directory.mkdir(parents=True, exist_ok=True)
    flag = "true" if insecure else "false"
    lines = ["[[registry]]", f"prefix = {toml_string(prefix)}", f"location = {toml_string(location)}", f"insecure = {flag}"]
    for mirror in mirrors:
        lines += ["", "[[registry.mirror]]", f"location = {toml_string(mirror)}", f"insecure = {flag}"]
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
            "[storage]", f"driver = {toml_string(storage_driver)}",
            f"graphroot = {toml_string(str(workdir / 'storage'))}", f"runroot = {toml_string(str(workdir / 'run'))}"]) + "\n")
        containers_conf = workdir / "containers.conf"
        containers_conf.write_text("\n".join([
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "none"',
            'lock_type = "file"',  # not shared memory in /dev/shm
            f"tmp_dir = {toml_string(str(workdir / 'libpod-tmp'))}",
            f"static_dir = {toml_string(str(workdir / 'storage' / 'libpod'))}",
            f"volume_path = {toml_string(str(workdir / 'storage' / 'volumes'))}",
            f"image_copy_tmp_dir = {toml_string(str(workdir / 'tmp'))}",
            "[network]",
            f"network_config_dir = {toml_string(str(workdir / 'networks'))}"]) + "\n")
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


# --- containerd ------------------------------------------------------------------------------

def hosts_dir(directory: Path, registry: str, server: str, mirrors: list[str]) -> Path:
    """A containerd hosts directory (for --hosts-dir, or config_path of the CRI plugin) where
    `registry` (docker.io) is at `server` and is tried first at each of `mirrors` ("http://host:port",
    or "http://host:port/v2/<namespace>", a path containerd then uses as it is)."""
    (directory / registry).mkdir(parents=True, exist_ok=True)
    lines = [f"server = {toml_string(server)}"]
    for mirror in mirrors:
        lines += ["", f"[host.{toml_string(mirror)}]", '  capabilities = ["pull", "resolve"]']
        if mirror.split("://", 1)[-1].partition("/")[2]:
            lines.append("  override_path = true")
    (directory / registry / "hosts.toml").write_text("\n".join(lines) + "\n")
    return directory


# --- containerd's requests, by hand -----------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def containerd_style_get(mirror_url: str, name: str, reference: str, ns: str | None = "docker.io",
                               method: str = "GET", accept: str = CONTAINERD_MANIFEST_ACCEPT) -> Answer:
    """`GET /v2/<name>/manifests/<reference>?ns=<ns>` at `mirror_url`, as containerd asks any host
    that is not registry `ns` itself (`ns=None`: no query). For a hosts.toml mirror with a path
    (`http://host/v2/docker.io`, override_path), pass `name="docker.io/library/redis"`."""
    url = f"{mirror_url.rstrip('/')}/v2/{name}/manifests/{reference}"
    params = {"ns": ns} if ns is not None else None
    headers = {"Accept": accept, "User-Agent": CONTAINERD_USER_AGENT}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, params=params, headers=headers, allow_redirects=False) as response:
            return Answer(response.status, dict(response.headers), await response.read())
