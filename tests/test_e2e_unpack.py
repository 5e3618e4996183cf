"""Unpacking real images: Kura's rootfs equals umoci's, and runc runs what Kura unpacked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import start_kura, stop

pytestmark = pytest.mark.e2e


def tree(root: Path) -> dict:
    """Every path with its type, mode, owner, and link target or size + content hash."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            info = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                info += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    info += (st.st_size, hashlib.file_digest(f, "sha256").hexdigest())
            out[os.path.relpath(path, root)] = info
    return out


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """redis and debian pulled by `kura pull --unpack` from a local kura serve."""
    require_shared()
    work = tmp_path_factory.mktemp("unpack")
    server = start_kura(work / "data")
    env = dict(os.environ, DOCKER_CONFIG=str(work / "docker"), HOME=str(work))
    timings = {}
    try:
        for image, tag in (("redis", "7"), ("debian", "bookworm")):
            subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                            f"oci:{IMAGES / image}:{tag}", f"docker://{server.host}/library/{image}:{tag}"],
                           check=True, capture_output=True, timeout=300)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "kura", "pull", f"{server.host}/library/redis:7",
                                 "--store", str(work / "store"), "--unpack", str(work / "redis"), "-q"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        timings["kura pull --unpack"] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
        start = time.perf_counter()
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{server.host}/library/redis:7",
                        f"oci:{work / 'skopeo-layout'}:7"], check=True, capture_output=True, timeout=300)
        subprocess.run(["umoci", "unpack", "--image", f"{work / 'skopeo-layout'}:7", str(work / "umoci-redis")],
                       check=True, capture_output=True, timeout=300)
        timings["skopeo copy + umoci unpack"] = time.perf_counter() - start
        result = subprocess.run([sys.executable, "-m", "kura", "pull", f"{server.host}/library/debian:bookworm",
                                 "--store", str(work / "store"), "--unpack", str(work / "debian"), "-q"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    finally:
        stop(server)
    print("\n" + ", ".join(f"{k}: {v:.2f}s" for k, v in timings.items()))
    yield work


def test_rootfs_matches_umoci(pulled):
    ours, theirs = tree(pulled / "redis" / "rootfs"), tree(pulled / "umoci-redis" / "rootfs")
    assert len(ours) > 6000
    assert sorted(set(ours) ^ set(theirs)) == []
    assert [p for p in ours if ours[p] != theirs[p]] == []  # whiteouts and the opaque dir included


def test_runtime_config(pulled):
    config = json.loads((pulled / "redis" / "config.json").read_text())
    assert config["process"]["args"] == ["redis-server"]
    assert config["process"]["cwd"] == "/data"
    assert config["process"]["terminal"] is False
    assert config["root"] == {"path": "rootfs", "readonly": False}
    assert {m["destination"] for m in config["mounts"]} >= {"/proc", "/dev", "/sys"}


def test_runc_runs_the_unpacked_debian(pulled):
    assert shutil.which("runc"), "runc is installed by make test"
    assert os.geteuid() == 0, "runc needs root here (CI runs as root)"
    bundle = pulled / "debian"
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["bash"]
    config["process"]["args"] = ["echo", "hello", "world"]
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"kura-test-{os.getpid()}"
    result = subprocess.run(["runc", "run", "-b", str(bundle), name], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    subprocess.run(["runc", "delete", "--force", name], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world\n"
