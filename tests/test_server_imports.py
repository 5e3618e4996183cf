"""A server with the default setup (filesystem storage, auth none or htpasswd, no proxy, no
TLS) never loads what only other setups need: `cryptography` (token auth, TLS), `obstore` and
the S3 driver, the client package `puller` (the pull-through cache), nor what only a browser's
visit needs (the web UI's pages, with jinja2). Each costs every server process megabytes of
memory.

The modules are read from a running `kura serve` after it answered pushes and pulls: the
process is started through a wrapper that writes its `sys.modules` when sent SIGUSR1 (forked
worker processes inherit the handler; each writes its own list)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from registry.auth import htpasswd
from tests.support.paths import REPO
from tests.support.servers import free_port, wait_for_challenge

OPTIONAL = ("cryptography", "obstore", "storage.s3", "puller", "registry.proxy.service", "registry.auth.jwt",
            "jinja2", "aiohttp_jinja2", "registry.ui.views")

WRAPPER = """
import json, os, signal, sys
from kura.__main__ import main

def dump(signum, frame):
    path = os.path.join(os.environ["KURA_MODULES_DUMP"], str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(sorted(sys.modules), f)
    os.rename(path + ".tmp", path + ".json")

signal.signal(signal.SIGUSR1, dump)
sys.exit(main(sys.argv[1:]))
"""


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def served_modules(tmp_path: Path, config: str, authorization: str | None = None, *,
                   exercise: bool = True, visit: str | None = None,
                   optional: tuple[str, ...] = OPTIONAL) -> set[str]:
    """The modules among `optional`'s that `kura serve` with `config` has loaded, in any of its
    processes, after a push and a pull (`exercise`; else after start-up alone), and a GET of
    `visit`."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "kura.toml").write_text(config)
    dumps = tmp_path / "modules"
    dumps.mkdir()
    port = free_port()
    log = open(tmp_path / "kura.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "serve", "--config", str(tmp_path / "kura.toml"),
         "--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "data")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, KURA_MODULES_DUMP=str(dumps)))
    log.close()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_challenge(f"{base}/v2/", process)
        if exercise:
            push_and_pull(base, authorization)
        if visit is not None:
            with urllib.request.urlopen(base + visit, timeout=20) as response:
                assert response.status == 200
        processes = [process.pid, *descendants(process.pid)]
        for pid in processes:
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20  # a bound on the wait, not a speed asserted
        while len(list(dumps.glob("*.json"))) < len(processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        lists = [json.loads(path.read_text()) for path in dumps.glob("*.json")]
        assert len(lists) == len(processes), (tmp_path / "kura.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    return {name for names in lists for name in names if name.startswith(optional)}


def push_and_pull(base: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    def call(method: str, path: str, data: bytes | None = None, **extra: str) -> bytes:
        request = urllib.request.Request(base + path, data=data, method=method, headers={**headers, **extra})
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.read()

    config = b"{}"
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    call("POST", f"/v2/team/app/blobs/uploads/?digest={digest}", config,
         **{"Content-Type": "application/octet-stream"})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest, "size": len(config)},
                           "layers": []}).encode()
    call("PUT", "/v2/team/app/manifests/v1", manifest,
         **{"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert call("GET", "/v2/team/app/manifests/v1", Accept="application/vnd.oci.image.manifest.v1+json") == manifest
    assert call("GET", f"/v2/team/app/blobs/{digest}") == config
    assert json.loads(call("GET", "/v2/team/app/tags/list"))["tags"] == ["v1"]
    assert json.loads(call("GET", "/v2/_catalog"))["repositories"] == ["team/app"]


def test_default_server_loads_no_optional_module(tmp_path):
    assert served_modules(tmp_path, "") == set()


def test_htpasswd_server_loads_no_optional_module(tmp_path):
    accounts = tmp_path / "htpasswd"
    htpasswd.set_user(accounts, "alice", "correct horse battery")
    basic = "Basic " + base64.b64encode(b"alice:correct horse battery").decode()
    assert served_modules(tmp_path, f'[auth]\nmode = "htpasswd"\nhtpasswd = "{accounts}"\n', basic) == set()


def test_prometheus_client_is_loaded_only_with_metrics_on(tmp_path):
    """1 MiB a process on import (about 3 MiB a worker once serving): the default has metrics
    on, so only `[metrics] enabled = false` saves it."""
    off = served_modules(tmp_path / "off", "[metrics]\nenabled = false\n", optional=("prometheus_client",))
    assert off == set()
    on = served_modules(tmp_path / "on", "", exercise=False, optional=("prometheus_client",))
    assert "prometheus_client" in on


def test_the_probe_sees_what_token_auth_and_a_proxy_load(tmp_path):
    """The same probe on a server configured to need them must find them (else the tests
    above would pass whatever the server imported)."""
    config = '[auth]\nmode = "token"\n\n[[proxy]]\nprefix = "docker.io"\nremote = "https://registry-1.docker.io"\n'
    loaded = served_modules(tmp_path, config, exercise=False, visit="/ui/login")
    assert {"cryptography", "puller", "registry.proxy.service", "registry.auth.jwt", "jinja2", "aiohttp_jinja2",
            "registry.ui.views"} <= loaded, loaded
