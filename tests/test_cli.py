"""The `kura` dispatcher and `kura serve` flags."""

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.paths import REPO
from tests.support.servers import free_port, start_kura, stop, wait_until_up


def kura(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_usage_and_unknown_command():
    assert "serve" in kura("--help").stdout
    result = kura("frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_version():
    from importlib.metadata import version
    for flag in ("--version", "-V"):
        result = kura(flag)
        assert result.returncode == 0 and result.stdout == f"kura {version('kura')}\n"


def test_mistyped_command_suggests_the_closest():
    result = kura("pul", "redis")
    assert result.returncode == 2
    assert result.stderr == "kura: unknown command 'pul'; did you mean 'pull'?\n"
    assert "did you mean 'serve'" in kura("sevre").stderr
    for other_tools in ("exec", "build"):  # docker's, not typos of ours
        assert kura(other_tools).stderr == f"kura: unknown command {other_tools!r} (kura --help lists them)\n"


@pytest.mark.parametrize("typed, suggested", [
    ("pul", "pull"), ("sevre", "serve"), ("imgaes", "images"), ("inpsect", "inspect"), ("delte", "delete"),
    ("unpakc", "unpack"), ("loign", "login"),
    # other tools' commands are not typos of ours: one edit (two from six letters) at most
    ("dif", "diff"), ("stpo", "stop"), ("rmm", "rm"), ("build", None), ("exec", None), ("commit", None),
])
def test_did_you_mean_only_for_a_close_typo(typed, suggested):
    from kura.__main__ import suggestion
    assert suggestion(typed) == suggested


def test_help_passes_every_word():
    result = kura("help", "user", "add")
    assert result.returncode == 0 and result.stdout.startswith("usage: kura user add"), result.stdout
    result = kura("help", "repo", "delete")
    assert result.returncode == 0 and result.stdout.startswith("usage: kura repo delete"), result.stdout


def test_help_command_shows_the_subcommands_help():
    for command, expected in (("pull", "usage: kura pull"), ("serve", "usage: kura serve")):
        result = kura("help", command)
        assert result.returncode == 0 and result.stdout.startswith(expected), result.stdout


def test_bad_config_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 5\n")
    result = kura("serve", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kura: ") and len(result.stderr.strip().splitlines()) == 1


def test_flags_override_config_file(tmp_path):
    port = free_port()
    cfg = tmp_path / "kura.toml"
    cfg.write_text(f'[server]\nlisten = "127.0.0.1:1"\n[storage]\nroot = "{tmp_path / "from-file"}"\n')
    server = start_kura(tmp_path / "from-flag", port, "--config", str(cfg))
    try:
        assert (tmp_path / "from-flag" / "blobs").is_dir()
        assert not (tmp_path / "from-file").exists()
    finally:
        stop(server)


def test_config_file_sets_listen_and_root(tmp_path):
    port = free_port()
    cfg = tmp_path / "kura.toml"
    cfg.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n[storage]\nroot = "{tmp_path / "r"}"\n')
    process = subprocess.Popen([sys.executable, "-m", "kura", "serve", "--config", str(cfg)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v2/", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/") as r:
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert (tmp_path / "r" / "blobs").is_dir()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_client_commands_do_not_load_the_server():
    code = ("import sys, kura.__main__ as m; m.main(['frobnicate']); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('registry', 'storage', 'aiohttp')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_user_add_and_remove(tmp_path):
    from registry.auth.htpasswd import Htpasswd
    import asyncio

    path = tmp_path / "htpasswd"
    result = kura("user", "add", "alice", "--file", str(path), input="first-password\n")
    assert result.returncode == 0 and "added alice" in result.stdout
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.read_text().startswith("alice:$2b$")
    result = kura("user", "add", "alice", "--file", str(path), input="second-password\n")
    assert "updated alice" in result.stdout
    assert asyncio.run(Htpasswd(path).check("alice", "second-password"))
    assert not asyncio.run(Htpasswd(path).check("alice", "first-password"))
    assert kura("user", "remove", "alice", "--file", str(path)).returncode == 0
    assert not Htpasswd(path).exists("alice")
    result = kura("user", "remove", "alice", "--file", str(path))
    assert result.returncode == 1 and "no user" in result.stderr
    result = kura("user", "add", "bad:name", "--file", str(path), input="x\n")
    assert result.returncode == 1 and "invalid user name" in result.stderr


def test_user_list(tmp_path):
    path = tmp_path / "htpasswd"
    missing = kura("user", "list", "--file", str(path))
    assert missing.returncode == 1
    assert missing.stderr == f"kura: {path} does not exist (kura user add creates it)\n" and missing.stdout == ""
    missing = kura("user", "list", "--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr == f"kura: {tmp_path / 'nowhere' / 'auth' / 'htpasswd'} does not exist (kura user add creates it)\n"
    for name in ("carol", "alice"):
        assert kura("user", "add", name, "--file", str(path), input="long-enough\n").returncode == 0
    result = kura("user", "list", "--file", str(path))
    assert result.returncode == 0 and result.stdout == "carol\nalice\n"
    # the default file is <root>/auth/htpasswd
    assert kura("user", "add", "dave", "--root", str(tmp_path / "r"), input="long-enough\n").returncode == 0
    assert kura("user", "list", "--root", str(tmp_path / "r")).stdout == "dave\n"


def test_user_add_refuses_a_short_password(tmp_path):
    path = tmp_path / "htpasswd"
    result = kura("user", "add", "alice", "--file", str(path), input="short\n")
    assert result.returncode == 1 and not path.exists()
    assert result.stderr == "kura: the password must have at least 8 characters (auth.min_password_length)\n"
    config = tmp_path / "kura.toml"
    config.write_text(f'[auth]\nmode = "htpasswd"\nhtpasswd = "{path}"\nmin_password_length = 4\n')
    assert kura("user", "add", "alice", "--config", str(config), input="short\n").returncode == 0
    assert kura("user", "list", "--config", str(config)).stdout == "alice\n"
    config.write_text('[auth]\nmode = "htpasswd"\nmin_password_length = 0\n')
    result = kura("user", "add", "alice", "--config", str(config), input="short\n")
    assert result.returncode == 2 and "min_password_length must be positive" in result.stderr


def test_htpasswd_from_apache_tools_is_accepted(tmp_path):
    import asyncio
    import shutil

    from registry.auth.htpasswd import Htpasswd
    assert shutil.which("htpasswd"), "apache2-utils is installed by make test"
    path = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-cbB", "-C", "5", str(path), "dave", "dave-pw"], check=True, capture_output=True)
    assert asyncio.run(Htpasswd(path).check("dave", "dave-pw"))
    assert not asyncio.run(Htpasswd(path).check("dave", "wrong"))


def test_no_auth_refused_off_loopback(tmp_path):
    result = kura("serve", "--listen", "0.0.0.0:5999", "--root", str(tmp_path))
    assert result.returncode == 2 and "--insecure-no-auth" in result.stderr


def test_dispatcher_routes_every_client_command():
    import kura.__main__ as dispatcher
    import puller.cli as client
    assert set(dispatcher.CLIENT_COMMANDS) == set(client.WITHOUT_STORE) | set(client.WITH_STORE)


def test_argument_errors_name_the_subcommand():
    for args, error in ((["pull", "--bogus", "redis"], "unrecognized arguments: --bogus"),
                        (["delete", "localhost:5000/a:1", "extra"], "unrecognized arguments: extra"),
                        (["pull"], "the following arguments are required: reference")):
        result = kura(*args)
        assert result.returncode == 2
        assert result.stderr == f"kura {args[0]}: {error} (see kura {args[0]} --help)\n", result.stderr


def test_server_argument_errors_name_the_subcommand(tmp_path):
    for argv, command, unknown in ((["serve", "--lisen", "127.0.0.1:5000"], "kura serve", "--lisen 127.0.0.1:5000"),
                                   (["fsck", "--rot", str(tmp_path)], "kura fsck", f"--rot {tmp_path}"),
                                   (["user", "add", "bob", "--flie", "x"], "kura user add", "--flie x"),
                                   (["user", "list", "--verbose"], "kura user list", "--verbose")):
        result = kura(*argv)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"{command}: unrecognized arguments: {unknown} (see {command} --help)\n", \
            result.stderr
    result = kura("user", "frob")
    assert result.returncode == 2 and result.stderr.startswith("kura user: argument action: invalid choice"), \
        result.stderr


def test_server_commands_have_described_help_with_examples():
    for argv, example in ((["serve"], "kura serve --config kura.toml"),
                          (["fsck"], "kura fsck --root /srv/kura"),
                          (["user"], "kura user add alice --config kura.toml"),
                          (["user", "add"], "echo \"$PASSWORD\" | kura user add alice --config kura.toml"),
                          (["user", "list"], "kura user list --config kura.toml"),
                          (["user", "remove"], "kura user remove alice --config kura.toml")):
        result = kura(*argv, "--help")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert any(line.strip() == example for line in lines), result.stdout  # a line of its own, as written


# ------------------------------------------------------------------ the server's commands at a terminal

def test_ctrl_c_at_the_user_add_password_prompt_exits_quietly(tmp_path):
    from tests.support.terminal import CTRL_C, Terminal

    path = tmp_path / "htpasswd"
    terminal = Terminal(tmp_path / "home", "user", "add", "alice", "--file", str(path))
    terminal.expect("Password: ")
    terminal.send(CTRL_C)
    code, output = terminal.wait()
    assert code == 130
    assert re.fullmatch(r"Password: (\^C)?\r\n", output), output
    assert not path.exists()


@pytest.mark.parametrize("at", ["Password: ", "Repeat password: "])
def test_ctrl_d_at_a_user_add_password_prompt_is_a_one_line_message(at, tmp_path):
    from tests.support.terminal import CTRL_D, Terminal

    path = tmp_path / "htpasswd"
    terminal = Terminal(tmp_path / "home", "user", "add", "alice", "--file", str(path))
    terminal.expect("Password: ")
    if at == "Repeat password: ":
        terminal.send(b"long-enough\r")
        terminal.expect(at)
    terminal.send(CTRL_D)
    code, output = terminal.wait()
    assert code == 1 and "Traceback" not in output
    assert output.endswith(f"{at}\r\nkura: no password given (end of input)\r\n"), output
    assert not path.exists()


def test_ctrl_c_during_fsck_is_one_line(tmp_path):
    from tests.support.terminal import CTRL_C, Terminal

    # A blob that is a named pipe: fsck blocks reading it, as it would hashing a large blob.
    prefix = tmp_path / "data" / "blobs" / "sha256" / "ab"
    prefix.mkdir(parents=True)
    os.mkfifo(prefix / ("ab" * 32))
    terminal = Terminal(tmp_path / "home", "fsck", "--root", str(tmp_path / "data"))
    time.sleep(0.5)  # let it start: send() then waits until it blocks on the pipe
    terminal.send(CTRL_C)
    code, output = terminal.wait()
    assert code == 130 and "Traceback" not in output, output
    assert output.endswith("kura: interrupted\r\n"), output


def test_dispatcher_routes_every_container_command():
    import containers.cli as containers
    import kura.__main__ as dispatcher
    assert set(dispatcher.CONTAINER_COMMANDS) | {"inspect"} == set(containers.HANDLERS)
