"""Start real registries on loopback: `kura serve` and the reference `docker-registry`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .paths import PEER_REGISTRY_SCRIPT, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class Server:
    name: str
    host: str  # host:port, as skopeo wants it
    root: Path  # storage root
    process: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def start_kura(root: Path, port: int | None = None, *args: str, log: Path | None = None,
               workers: int | None = 1) -> Server:
    """`kura serve` on loopback: one process unless `workers` says otherwise (None: as the
    config file or the default, one per CPU core, decides)."""
    port = port or free_port()
    if workers is not None:
        args = ("--workers", str(workers), *args)
    root.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log or (root.parent / f"kura-{port}.log"), "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kura", "serve", "--listen", f"127.0.0.1:{port}", "--root", str(root), *args],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log_file.close()
    wait_for_challenge(f"http://127.0.0.1:{port}/v2/", process)
    return Server("kura", f"127.0.0.1:{port}", root, process)


def stop(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.process is None:
        return
    if server.process.poll() is None:
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _distribution_env() -> dict[str, str]:
    # distribution reads REGISTRY_* variables as config overrides (REGISTRY_AUTH_FILE, set
    # for skopeo, would become auth.file): keep them away from it.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def start_distribution(workdir: Path, auth: str | None = None) -> Server:
    """The reference registry (CNCF distribution) via shared/tools/peer-registry.sh; with
    `auth` ("user:password"), behind htpasswd Basic auth."""
    port = free_port()
    env = dict(_distribution_env(), LOGLEVEL="error")
    flags = ["--auth", auth] if auth else []
    subprocess.run(["bash", str(PEER_REGISTRY_SCRIPT), *flags, str(port), str(workdir)], check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return Server("distribution", f"127.0.0.1:{port}", workdir / "storage", extra={"workdir": workdir})


def stop_distribution(server: Server) -> None:
    subprocess.run(["bash", str(PEER_REGISTRY_SCRIPT), "--stop", str(server.extra["workdir"])],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def start_distribution_trusting(workdir: Path, realm: str, service: str, issuer: str, bundle: Path) -> Server:
    """The reference registry configured with `auth.token`, trusting tokens from `issuer`."""
    port = free_port()
    config = distribution_config(workdir, port, f"""auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {bundle}
""")
    process = run_distribution(workdir, config)
    wait_for_challenge(f"http://127.0.0.1:{port}/v2/", process)
    return Server("distribution", f"127.0.0.1:{port}", workdir / "storage", process)


def distribution_config(workdir: Path, port: int, extra: str = "") -> str:
    """docker-registry's config: storage under workdir/storage (deletes on), 127.0.0.1:`port`,
    logging errors only; `extra` adds top-level sections (YAML)."""
    return f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {workdir / 'storage'}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra}"""


def run_distribution(workdir: Path, config: str) -> subprocess.Popen:
    """`docker-registry serve` on `config` (written to workdir/config.yml), logging to
    workdir/registry.log; the caller waits for it to answer."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yml"
    path.write_text(config)
    with open(workdir / "registry.log", "ab") as log:
        return subprocess.Popen(["docker-registry", "serve", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_distribution_env())


def wait_for_challenge(url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait until a registry with auth answers `GET /v2/` (with 401)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")
