"""Securing `kura serve`: the README's "Secure it" steps, run exactly as written, work; the
server says at start-up which auth mode it runs and whose accounts it knows, and warns when
nobody could log in or passwords would cross the network in clear; failed logins are
WARNINGs naming the user, the client and the reason, never the password."""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from registry.auth import htpasswd
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import free_port, start_kura, stop, wait_for_challenge

pytestmark = pytest.mark.e2e
PASSWORD = "correct-horse-battery"


def secure_it_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Secure it\n")
    return text[start:text.index("\n## ", start + 1)]


def readme_steps() -> tuple[str, list[str]]:
    """The config file and the command lines of "Secure it", in order, as written."""
    section = secure_it_section()
    configs = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(configs) == 1, "Secure it shows one config file"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return configs[0], commands


def kura_command(line: str) -> tuple[list[str], bool]:
    """`kura ...` (or `echo "$PASSWORD" | kura ...`) as argv, and whether it reads the password."""
    piped = line.startswith('echo "$PASSWORD" | ')
    argv = shlex.split(line.removeprefix('echo "$PASSWORD" | '))
    assert argv[0] == "kura", line
    return [sys.executable, "-m", "kura", *argv[1:]], piped


def test_readme_secure_it_steps_work_as_written(tmp_path):
    require_shared()
    config_text, commands = readme_steps()
    assert [c for c in commands if " --root " in f" {c} "] == [], "every step names the same config, not a root"
    port = free_port()
    srv = tmp_path / "srv"  # stands for the machine's /srv
    srv.mkdir()
    work = tmp_path / "work"
    work.mkdir()

    def local(text: str) -> str:
        return (text.replace("/srv/kura", str(srv / "kura")).replace("0.0.0.0:5000", f"127.0.0.1:{port}")
                .replace("HOST:5000", f"127.0.0.1:{port}"))

    assert 'root = "/srv/kura"' in config_text and 'mode = "token"' in config_text
    (work / "kura.toml").write_text(local(config_text))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = None
    log = tmp_path / "serve.log"
    try:
        for line in commands:
            argv, piped = kura_command(local(line))
            if argv[3] == "serve":
                with open(log, "wb") as out:
                    process = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
                server = process
                wait_for_challenge(f"http://127.0.0.1:{port}/v2/", process)
                continue
            stdin = PASSWORD + "\n" if piped or argv[3:5] == ["user", "add"] else ""
            ran = subprocess.run(argv, cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=120)
            assert ran.returncode == 0, (line, ran.stdout, ran.stderr)
        assert server is not None, "Secure it starts the server"
        accounts = srv / "kura" / "auth" / "htpasswd"
        assert f"INFO kura.server: auth: token mode, 1 account from {accounts}" in log.read_text()

        # Logged in as the README says: push and pull with that login.
        target = f"127.0.0.1:{port}/alice/busybox:1"
        for argv in (["push", f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64", target, "-q"],
                     ["pull", target, "-q"]):
            ran = subprocess.run([sys.executable, "-m", "kura", *argv], cwd=work, env=env, capture_output=True,
                                 text=True, timeout=120)
            assert ran.returncode == 0, (argv, ran.stderr)
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/alice/busybox/tags/list")
        assert anonymous.value.code == 401
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    assert PASSWORD not in log.read_text()


def serve_with(tmp_path: Path, config: str, *args: str, users: dict | None = None, port: int | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "data"
    for user, password in (users or {}).items():
        htpasswd.set_user(root / "auth" / "htpasswd", user, password, cost=4)
    path = tmp_path / "kura.toml"
    path.write_text(config)
    log = tmp_path / "kura.log"
    return start_kura(root, port, "--config", str(path), *args, log=log), log


def warnings(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " WARNING " in line]


@pytest.mark.parametrize("mode", ["token", "htpasswd"])
def test_nobody_can_log_in_is_a_warning(tmp_path, mode):
    server, log = serve_with(tmp_path, f'[auth]\nmode = "{mode}"\n')
    stop(server)
    accounts = tmp_path / "data" / "auth" / "htpasswd"
    assert f"auth: {mode} mode, 0 accounts from {accounts}" in log.read_text()
    assert [w for w in warnings(log) if f"no accounts in {accounts} and no rule for anonymous users" in w], \
        log.read_text()


def test_anonymous_rule_or_an_account_means_no_warning(tmp_path):
    public = '[auth]\nmode = "token"\n[[auth.rules]]\nrepositories = ["public/**"]\nanonymous = true\nactions = ["pull"]\n'
    server, log = serve_with(tmp_path / "a", public)
    stop(server)
    assert warnings(log) == []
    server, log = serve_with(tmp_path / "b", '[auth]\nmode = "htpasswd"\n', users={"bob": PASSWORD})
    stop(server)
    assert warnings(log) == [] and "auth: htpasswd mode, 1 account from" in log.read_text()


def test_passwords_over_plain_http_off_loopback_are_a_warning(tmp_path):
    # Listening on every address; the test only ever connects to 127.0.0.1.
    port = free_port()
    server, log = serve_with(tmp_path, '[auth]\nmode = "token"\n', "--listen", f"0.0.0.0:{port}",
                             users={"bob": PASSWORD}, port=port)
    stop(server)
    assert [w for w in warnings(log) if f"serving plain HTTP on 0.0.0.0:{port}" in w
            and "passwords and tokens cross the network in clear" in w], log.read_text()
    server, log = serve_with(tmp_path / "loopback", '[auth]\nmode = "token"\n', users={"bob": PASSWORD})
    stop(server)
    assert warnings(log) == []


def test_failed_logins_are_warnings_without_the_password(tmp_path):
    server, log = serve_with(tmp_path, '[log]\nlevel = "debug"\n[auth]\nmode = "token"\nlogin_attempts = 2\n',
                             users={"alice": PASSWORD})
    guesses = ["guess-one-xyzzy", "guess-two-plugh", "guess-three-frotz"]
    try:
        def token(user: str, password: str) -> int:
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            request = urllib.request.Request(f"{server.url}/auth/token?service=kura",
                                             headers={"Authorization": f"Basic {credentials}"})
            try:
                with urllib.request.urlopen(request) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert token("alice", PASSWORD) == 200
        assert token("mallory", guesses[0]) == 401
        assert token("alice", guesses[1]) == 401
        assert token("alice", guesses[2]) == 401
        assert token("alice", guesses[2]) == 429  # two failures for alice from here: locked out
    finally:
        stop(server)
    text = log.read_text()
    failed = [line for line in warnings(log) if "failed login" in line]
    assert len(failed) == 4, text
    assert "failed login for user 'mallory' from 127.0.0.1: unknown user" in failed[0]
    assert "failed login for user 'alice' from 127.0.0.1: wrong password" in failed[1]
    assert "failed login for user 'alice' from 127.0.0.1: wrong password" in failed[2]
    assert "failed login for user 'alice' from 127.0.0.1: locked out" in failed[3]
    for secret in [PASSWORD, *guesses]:
        assert secret not in text
