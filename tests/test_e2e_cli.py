"""The registry commands a new user reaches for after `kura pull`: `kura delete` against Kura and
the reference registry (which cannot delete a tag by itself), `kura login`/`logout` against
htpasswd Basic auth, prompts at a real terminal, and `kura images`."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import client_env, one_line_error
from tests.support.layouts import tag_digest
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import start_distribution, start_kura, stop, stop_distribution
from tests.support.terminal import CTRL_C, CTRL_D, Terminal

pytestmark = pytest.mark.e2e

BUSYBOX = f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64"


def kura(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=client_env(home), input=stdin)




@pytest.fixture(scope="module")
def kura_registry(tmp_path_factory):
    require_shared()
    work = tmp_path_factory.mktemp("kura")
    server = start_kura(work / "data", None, log=work / "kura.log")
    yield server
    stop(server)


@pytest.fixture(scope="module")
def reference_registry(tmp_path_factory):
    require_shared()
    server = start_distribution(tmp_path_factory.mktemp("distribution"))
    yield server
    stop_distribution(server)


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    """The reference registry behind htpasswd Basic auth (alice / alice-pw)."""
    require_shared()
    server = start_distribution(tmp_path_factory.mktemp("basic"), auth="alice:alice-pw")
    yield server
    stop_distribution(server)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def push_two_tags(home: Path, host: str, repository: str) -> str:
    """The same manifest under tags `a` and `b`, and `other` for another manifest; returns a's digest."""
    for tag in ("a", "b"):
        assert kura(home, "push", "-q", BUSYBOX, f"{host}/{repository}:{tag}").returncode == 0
    other = f"oci:{IMAGES / 'busybox-multiarch'}:latest-arm64"
    assert kura(home, "push", "-q", other, f"{host}/{repository}:other").returncode == 0
    return tag_digest(IMAGES / "busybox-multiarch", "latest-amd64")


def tags(home: Path, host: str, repository: str) -> list[str]:
    listed = kura(home, "tags", "--json", f"{host}/{repository}")
    assert listed.returncode == 0, listed.stderr
    return sorted(json.loads(listed.stdout))


# ------------------------------------------------------------------------------ delete

def test_delete_a_tag_on_kura_deletes_only_that_tag(kura_registry, home):
    host = kura_registry.host
    push_two_tags(home, host, "del/tag")
    deleted = kura(home, "delete", f"{host}/del/tag:a")  # no terminal and no --yes: nothing to confirm
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == f"deleted tag {host}/del/tag:a (the manifest stays, with any other tags pointing at it)\n"
    assert tags(home, host, "del/tag") == ["b", "other"]


def test_delete_a_tag_on_the_reference_registry_needs_yes(reference_registry, home):
    host = reference_registry.host
    digest = push_two_tags(home, host, "del/ref")
    message = one_line_error(kura(home, "delete", f"{host}/del/ref:a"))
    assert digest in message and "every tag" in message and "--yes" in message
    assert tags(home, host, "del/ref") == ["a", "b", "other"]  # nothing deleted

    deleted = kura(home, "delete", "--yes", f"{host}/del/ref:a")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == (f"deleted manifest {digest} from {host}/del/ref, "
                              "and with it every tag that pointed at it\n")
    assert tags(home, host, "del/ref") == ["other"]  # b pointed at it too


def test_delete_by_digest_says_what_it_deleted(kura_registry, reference_registry, home):
    for host in (kura_registry.host, reference_registry.host):
        digest = push_two_tags(home, host, "del/digest")
        deleted = kura(home, "delete", f"{host}/del/digest@{digest}")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout == (f"deleted manifest {digest} from {host}/del/digest, "
                                  "and with it every tag that pointed at it\n")
        assert tags(home, host, "del/digest") == ["other"]


@pytest.mark.parametrize("answer, deleted", [(b"n\r", False), (b"y\r", True), (CTRL_D, False), (CTRL_C, False)],
                         ids=["no", "yes", "end of input", "ctrl-c"])
def test_delete_asks_at_a_terminal(answer, deleted, reference_registry, home, tmp_path):
    host = reference_registry.host
    repository = f"del/ask-{answer.hex()}"
    digest = push_two_tags(home, host, repository)
    terminal = Terminal(home, "delete", f"{host}/{repository}:a")
    terminal.expect("[y/N] ")
    assert digest in terminal.output.decode() and "every tag" in terminal.output.decode()
    terminal.send(answer)
    code, output = terminal.wait()
    assert "Traceback" not in output
    if deleted:
        assert code == 0 and f"deleted manifest {digest}" in output
        assert tags(home, host, repository) == ["other"]
    elif answer == CTRL_C:
        assert code == 130 and output.endswith("[y/N] ^C\r\n"), output
        assert tags(home, host, repository) == ["a", "b", "other"]
    else:
        assert code == 1 and output.splitlines()[-1] == "kura: nothing deleted"
        assert tags(home, host, repository) == ["a", "b", "other"]


def test_delete_of_a_missing_tag_says_so(reference_registry, kura_registry, home):
    for host in (kura_registry.host, reference_registry.host):
        push_two_tags(home, host, "del/missing")
        message = one_line_error(kura(home, "delete", "--yes", f"{host}/del/missing:nope"))
        assert message == f"kura: {host}/del/missing:nope not found"


def test_delete_on_a_registry_that_deletes_nothing(tmp_path, home):
    require_shared()
    config = tmp_path / "kura.toml"
    config.write_text("[storage]\ndelete_enabled = false\n")
    server = start_kura(tmp_path / "data", None, "--config", str(config))
    try:
        digest = push_two_tags(home, server.host, "del/off")
        message = one_line_error(kura(home, "delete", "--yes", f"{server.host}/del/off:a"))
        assert message == (f"kura: {server.host} refused to delete {server.host}/del/off:a (HTTP 405 UNSUPPORTED: "
                           "deletes are disabled on this registry); nothing deleted")
        assert one_line_error(kura(home, "delete", f"{server.host}/del/off@{digest}")) == (
            f"kura: {server.host} refused to delete manifest {digest} (HTTP 405 UNSUPPORTED: "
            "deletes are disabled on this registry); nothing deleted")
        # Without --yes the registry's own reason is shown, and no manifest delete is offered
        # (it would be refused too): not in a script, and not at a terminal.
        assert one_line_error(kura(home, "delete", f"{server.host}/del/off:b")) == message.replace(":a ", ":b ")
        terminal = Terminal(home, "delete", f"{server.host}/del/off:a")
        code, output = terminal.wait()
        assert code == 1 and "[y/N]" not in output, output
        assert output == message + "\r\n"
        assert tags(home, server.host, "del/off") == ["a", "b", "other"]
    finally:
        stop(server)


# ------------------------------------------------------------------------------- login

def test_login_with_a_wrong_password_names_the_registry(basic_registry, home):
    host = basic_registry.host
    message = one_line_error(kura(home, "login", "-u", "alice", "--password-stdin", host, stdin="wrong\n"))
    assert message == f"kura: login to {host} failed: invalid username or password"


def test_login_and_logout_leave_only_config_json(basic_registry, home):
    host = basic_registry.host
    docker = home / "docker"
    docker.mkdir(parents=True)
    (docker / "config.json").write_text(json.dumps({"auths": {}, "psFormat": "table {{.ID}}"}))
    ok = kura(home, "login", "-u", "alice", "--password-stdin", host, stdin="alice-pw\n")
    assert ok.returncode == 0, ok.stderr
    assert os.listdir(docker) == ["config.json"]
    assert stat.S_IMODE((docker / "config.json").stat().st_mode) == 0o600
    config = json.loads((docker / "config.json").read_text())
    assert config["psFormat"] == "table {{.ID}}" and host in config["auths"]
    assert kura(home, "logout", host).returncode == 0
    assert os.listdir(docker) == ["config.json"]
    assert json.loads((docker / "config.json").read_text()) == {"auths": {}, "psFormat": "table {{.ID}}"}


@pytest.mark.parametrize("at", ["Username: ", "Password: "])
def test_ctrl_c_at_a_login_prompt_exits_quietly(at, home):
    terminal = Terminal(home, "login", "127.0.0.1:1")  # nothing is sent before the password is typed
    terminal.expect("Username: ")
    if at == "Password: ":
        terminal.send(b"alice\r")
        terminal.expect("Password: ")
    terminal.send(CTRL_C)
    code, output = terminal.wait()
    assert code == 130
    # The prompt's line ends (after the ^C the terminal echoes) and nothing else is said.
    assert re.fullmatch(rf"(Username: alice\r\n)?{at}(\^C)?\r\n", output), output


@pytest.mark.parametrize("at, what", [("Username: ", "username"), ("Password: ", "password")])
def test_ctrl_d_at_a_login_prompt_is_a_one_line_message(at, what, home):
    terminal = Terminal(home, "login", "127.0.0.1:1")
    terminal.expect("Username: ")
    if at == "Password: ":
        terminal.send(b"alice\r")
        terminal.expect("Password: ")
    terminal.send(CTRL_D)
    code, output = terminal.wait()
    assert code == 1 and "Traceback" not in output
    assert output.endswith(f"{at}\r\nkura: no {what} given (end of input)\r\n"), output
    assert not (home / "docker" / "config.json").exists()


# ------------------------------------------------------------------------------ images

def test_images_shows_the_platform_of_a_single_platform_image_and_a_human_size(kura_registry, home):
    host = kura_registry.host
    for tag in ("latest-amd64", "latest-arm64"):
        assert kura(home, "push", "-q", f"oci:{IMAGES / 'busybox-multiarch'}:{tag}", f"{host}/img/busybox:{tag}"
                    ).returncode == 0
        assert kura(home, "pull", "-q", f"{host}/img/busybox:{tag}").returncode == 0
    listed = kura(home, "images")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[2:] for line in listed.stdout.splitlines()[1:]}
    assert rows[f"{host}/img/busybox:latest-amd64"] == ["linux/amd64", "1.08", "MB"]
    assert rows[f"{host}/img/busybox:latest-arm64"] == ["linux/arm64", "1.04", "MB"]
    machine = {row["reference"]: row for row in json.loads(kura(home, "images", "--json").stdout)}
    stored = machine[f"{host}/img/busybox:latest-amd64"]
    assert stored["platform"] == "linux/amd64"
    assert stored["size"] == 1084928  # exact bytes: manifest, config and layer as stored
