"""`kura run` and the container commands end to end, on real runc as root: images pulled once
per module from a local Kura registry (the shared debian and redis layouts pushed by skopeo)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import client_env
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.runc import skip_without_runc
from tests.support.servers import free_port, start_kura, stop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    skip_without_runc()
    require_shared()
    work = tmp_path_factory.mktemp("run")
    server = start_kura(work / "registry")
    for layout, tag in (("debian", "bookworm"), ("redis", "7")):
        subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{IMAGES / layout}:{tag}", f"docker://{server.host}/library/{layout}:{tag}"],
                       check=True, capture_output=True, timeout=300)
    environment = dict(client_env(work / "home"), PYTHONPATH=str(REPO))
    context = Env(work / "store", environment, f"{server.host}/library/debian:bookworm",
                  f"{server.host}/library/redis:7")
    yield context
    ids = context.kura("ps", "-aq").stdout.split()
    if ids:
        context.kura("rm", "-f", *ids)
    stop(server)


class Env:
    def __init__(self, store: Path, environment: dict, debian: str, redis: str):
        self.store, self.environment, self.debian, self.redis = store, environment, debian, redis

    def kura(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kura", args[0], "--store", str(self.store), *args[1:]],
                              cwd="/", capture_output=True, text=True, timeout=timeout, env=self.environment)

    def lowers(self) -> list[Path]:
        return sorted((self.store / "containers" / "lowers").iterdir())


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def tree_hash(root: Path) -> str:
    """Names, modes, link targets and contents of every entry below `root`."""
    h = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(directory, name)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{st.st_mode}\0{st.st_uid}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


def test_hello_world_pulls_then_runs_and_rm_removes(env):
    result = env.kura("run", "--rm", env.debian, "echo", "hello", "world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world\n"
    assert "pulling it" in result.stderr
    assert env.kura("ps", "-aq").stdout == ""  # --rm: nothing left
    assert not list((env.store / ".kura" / "holds").iterdir())


def test_exit_code_is_passed_through(env):
    result = env.kura("run", "--rm", env.debian, "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr


def test_env_workdir_volume_and_user(env, tmp_path):
    (tmp_path / "note").write_text("from the host\n")
    result = env.kura("run", "--rm", "-e", "GREETING=hi there", "-w", "/var", "-v", f"{tmp_path / 'note'}:/note:ro",
                      "-u", "nobody", env.debian, "sh", "-c", 'echo "$GREETING"; pwd; cat /note; id -u')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hi there", "/var", "from the host", "65534"]


def test_stdin_with_i_and_an_isolated_network(env):
    piped = subprocess.run([sys.executable, "-m", "kura", "run", "--store", str(env.store), "--rm", "-i", env.debian,
                            "cat"], input="through stdin\n", cwd="/", capture_output=True, text=True, timeout=120,
                           env=env.environment)
    assert piped.returncode == 0 and piped.stdout == "through stdin\n", piped.stderr
    isolated = env.kura("run", "--rm", "--network", "none", env.debian, "cat", "/proc/net/dev")
    interfaces = [line.split(":")[0].strip() for line in isolated.stdout.splitlines()[2:]]
    assert interfaces == ["lo"], isolated.stdout
    shared = env.kura("run", "--rm", env.debian, "cat", "/proc/net/dev")
    assert len(shared.stdout.splitlines()[2:]) == len(Path("/proc/net/dev").read_text().splitlines()[2:])


def test_a_container_whose_process_was_killed_shows_exited_with_its_code(env):
    started = env.kura("run", "-d", "--name", "victim", env.debian, "sleep", "600")
    assert started.returncode == 0, started.stderr
    pid = json.loads(env.kura("inspect", "victim").stdout)["state"]["pid"]
    os.kill(pid, 9)  # from outside, as the OOM killer would
    for _ in range(200):
        if "Exited (137)" in env.kura("ps", "-a").stdout:
            break
        time.sleep(0.05)
    assert json.loads(env.kura("inspect", "victim").stdout)["state"]["exit_code"] == 137
    assert env.kura("rm", "victim").returncode == 0


def test_a_detached_redis_lifecycle(env):
    port = free_port()
    started = env.kura("run", "-d", "-q", "--name", "r1", env.redis, "redis-server", "--port", str(port))
    assert started.returncode == 0, started.stderr
    cid = started.stdout.strip()
    assert len(cid) == 64 and int(cid, 16) >= 0
    assert _ask_redis(port) == b"+PONG\r\n"
    listed = env.kura("ps").stdout.splitlines()
    assert any(line.startswith(cid[:12]) and " Up " in line and line.endswith("r1") for line in listed), listed
    assert "Ready to accept connections" in env.kura("logs", "r1").stdout
    inspected = json.loads(env.kura("inspect", "r1").stdout)
    assert inspected["id"] == cid and inspected["state"]["status"] == "running" and inspected["state"]["pid"] > 0
    assert inspected["mounts"][0]["type"] == "overlay"

    refused = env.kura("rmi", env.redis)
    assert refused.returncode == 1 and "used by container r1" in refused.stderr

    stopped = env.kura("stop", "-t", "20", "r1", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    inspected = json.loads(env.kura("inspect", "r1").stdout)
    assert inspected["state"]["status"] == "exited" and inspected["state"]["exit_code"] == 0  # SIGTERM was enough
    assert "Exited (0)" in env.kura("ps", "-a").stdout
    assert cid[:12] not in env.kura("ps").stdout
    upper = Path(inspected["mounts"][0]["upper"])
    assert upper.is_dir()
    assert env.kura("rm", "r1").returncode == 0
    assert not upper.exists() and not (env.store / "containers" / cid).exists()
    assert not (env.store / "containers" / "runc" / cid).exists()
    lower = Path(inspected["mounts"][0]["lower"])
    assert env.kura("rmi", env.redis).returncode == 0  # nothing uses it now
    assert env.kura("run", "--rm", env.debian, "true").returncode == 0
    assert not lower.exists()  # the next run removed the lower of an image the store no longer has


def _ask_redis(port: int) -> bytes:
    for _ in range(200):  # redis may still be starting when `kura run -d` returns
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise AssertionError("redis never listened")


def test_rm_refuses_a_running_container_without_force(env):
    started = env.kura("run", "-d", "--name", "sleeper", env.debian, "sleep", "600")
    assert started.returncode == 0, started.stderr
    refused = env.kura("rm", "sleeper")
    assert refused.returncode == 1 and "is running" in refused.stderr
    assert env.kura("rm", "-f", "sleeper").returncode == 0
    assert "sleeper" not in env.kura("ps", "-a").stdout


def test_diff_and_the_lower_directory_is_untouched(env):
    assert env.kura("run", "--rm", env.debian, "true").returncode == 0  # the lower exists
    [lower] = [p for p in env.lowers() if p.name.endswith(_stored_digest(env, env.debian))]
    before = tree_hash(lower)
    ran = env.kura("run", "--name", "d1", env.debian, "sh", "-c",
                   "touch /tmp/new && rm /etc/issue.net && echo x >> /etc/motd")
    assert ran.returncode == 0, ran.stderr
    diff = env.kura("diff", "d1")
    assert diff.returncode == 0, diff.stderr
    assert diff.stdout.splitlines() == ["C /etc", "D /etc/issue.net", "C /etc/motd", "C /tmp", "A /tmp/new"]
    assert tree_hash(lower) == before
    assert env.kura("rm", "d1").returncode == 0


def test_two_containers_share_one_lower(env):
    first = env.kura("run", "--name", "s1", env.debian, "true")
    assert first.returncode == 0, first.stderr
    lowers, used = env.lowers(), du(env.store / "containers" / "lowers")
    second = env.kura("run", "--name", "s2", env.debian, "sh", "-c", "echo more > /root/file")
    assert second.returncode == 0, second.stderr
    assert env.lowers() == lowers
    assert du(env.store / "containers" / "lowers") == used
    records = [json.loads(env.kura("inspect", name).stdout) for name in ("s1", "s2")]
    assert records[0]["mounts"][0]["lower"] == records[1]["mounts"][0]["lower"]
    assert du(Path(records[1]["mounts"][0]["upper"])) < used // 100  # a container's own layer is small
    assert env.kura("rm", "s1", "s2").returncode == 0


def test_names_are_unique_and_errors_are_one_line(env):
    assert env.kura("run", "--name", "u1", env.debian, "true").returncode == 0
    again = env.kura("run", "--name", "u1", env.debian, "true")
    assert again.returncode == 125 and again.stderr.count("\n") == 1 and "already in use" in again.stderr
    assert env.kura("rm", "u1").returncode == 0
    missing = env.kura("logs", "nope")
    assert missing.returncode == 1 and "no container 'nope'" in missing.stderr


def _stored_digest(env: Env, reference: str) -> str:
    images = json.loads(env.kura("images", "--json").stdout)
    return next(i["digest"] for i in images if i["reference"] == reference).split(":")[1]


@pytest.mark.parametrize("command", ["run", "ps", "logs", "stop", "rm", "diff"])
def test_every_container_command_has_help_with_an_example(command):
    result = subprocess.run([sys.executable, "-m", "kura", command, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "Example" in result.stdout
