"""`kura run`'s runtime config: each of `docker run`'s rules for the command, environment, working
directory, user, volumes, network and hostname, on a small fake rootfs (a parser: no runc here;
tests/test_e2e_container_diff.py runs the result)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from containers.spec import RunOptions, SpecError, runtime_spec
from puller.bundle import CAPABILITIES, DEFAULT_PATH

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
redis:x:999:999::/home/redis:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """root:x:0:
daemon:x:1:
adm:x:4:redis
staff:x:50:daemon,redis
redis:x:999:
nogroup:x:65534:
"""


@pytest.fixture
def rootfs(tmp_path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def spec(rootfs, config=None, hostname="0123456789ab", **options) -> dict:
    image = {"config": {"Cmd": ["bash"]} if config is None else config}
    return runtime_spec(image, rootfs, RunOptions(**options), hostname)


def args(rootfs, config, **options) -> list[str]:
    return spec(rootfs, config, **options)["process"]["args"]


def env(rootfs, config=None, **options) -> list[str]:
    return spec(rootfs, config, **options)["process"]["env"]


def user(rootfs, config=None, **options) -> tuple:
    process = spec(rootfs, config, **options)["process"]
    home = next(e for e in process["env"] if e.startswith("HOME="))
    return process["user"]["uid"], process["user"]["gid"], process["user"]["additionalGids"], home


# The command: Entrypoint + Cmd, as docker run replaces them.

ENTRY = {"Entrypoint": ["/entry.sh", "-x"], "Cmd": ["serve", "--port", "1"]}


def test_the_image_runs_entrypoint_then_cmd(rootfs):
    assert args(rootfs, ENTRY) == ["/entry.sh", "-x", "serve", "--port", "1"]
    assert args(rootfs, {"Cmd": ["bash"]}) == ["bash"]
    assert args(rootfs, {"Entrypoint": ["redis-server"]}) == ["redis-server"]


def test_arguments_after_the_image_replace_cmd_only(rootfs):
    assert args(rootfs, ENTRY, command=("sh", "-c", "exit 3")) == ["/entry.sh", "-x", "sh", "-c", "exit 3"]
    assert args(rootfs, {"Cmd": ["bash"]}, command=("echo", "hello world")) == ["echo", "hello world"]


def test_entrypoint_flag_replaces_it_and_drops_the_image_cmd(rootfs):
    assert args(rootfs, ENTRY, entrypoint="/bin/sh -c") == ["/bin/sh -c"]  # one word, never split
    assert args(rootfs, ENTRY, entrypoint="/bin/echo", command=("a", "b")) == ["/bin/echo", "a", "b"]


def test_an_empty_entrypoint_clears_it(rootfs):
    assert args(rootfs, ENTRY, entrypoint="", command=("id",)) == ["id"]
    with pytest.raises(SpecError, match="^no command specified$"):
        args(rootfs, ENTRY, entrypoint="")


def test_nothing_to_run_is_an_error(rootfs):
    with pytest.raises(SpecError, match="^no command specified$"):
        args(rootfs, {})
    with pytest.raises(SpecError, match="^no command specified$"):
        args(rootfs, {"Entrypoint": [], "Cmd": []})
    assert args(rootfs, {}, command=("true",)) == ["true"]


# The environment: PATH and HOSTNAME first, -e before the image's Env, HOME last.

def test_environment_defaults(rootfs):
    assert env(rootfs) == [DEFAULT_PATH, "HOSTNAME=0123456789ab", "HOME=/root"]


def test_the_image_path_replaces_the_default_in_place(rootfs):
    config = {"Cmd": ["x"], "Env": ["GOSU=1.17", "PATH=/opt/bin:/usr/bin", "REDIS=7"]}
    assert env(rootfs, config) == ["PATH=/opt/bin:/usr/bin", "HOSTNAME=0123456789ab", "GOSU=1.17", "REDIS=7",
                                   "HOME=/root"]


def test_flags_override_the_image_env_by_key(rootfs):
    config = {"Cmd": ["x"], "Env": ["A=image", "B=image"]}
    assert env(rootfs, config, env=("B=flag", "C=flag", "PATH=/x")) == [
        "PATH=/x", "HOSTNAME=0123456789ab", "B=flag", "C=flag", "A=image", "HOME=/root"]


def test_a_later_flag_wins(rootfs):
    assert env(rootfs, env=("A=1", "A=2"))[2] == "A=2"
    assert [e for e in env(rootfs, env=("A=1", "A=2")) if e.startswith("A=")] == ["A=2"]


def test_a_bare_key_takes_the_callers_value(rootfs, monkeypatch):
    monkeypatch.setenv("KURA_TEST_VALUE", "from the caller = here")
    assert "KURA_TEST_VALUE=from the caller = here" in env(rootfs, env=("KURA_TEST_VALUE",))


def test_a_bare_key_the_caller_lacks_unsets_it(rootfs, monkeypatch):
    monkeypatch.delenv("KURA_TEST_UNSET", raising=False)
    config = {"Cmd": ["x"], "Env": ["KURA_TEST_UNSET=image", "KEPT=1"]}
    result = env(rootfs, config, env=("KURA_TEST_UNSET",))
    assert not [e for e in result if e.startswith("KURA_TEST_UNSET")]
    assert "KEPT=1" in result


def test_an_empty_value_is_kept(rootfs):
    assert "A=" in env(rootfs, env=("A=",))


def test_an_empty_key_is_an_error(rootfs):
    with pytest.raises(SpecError, match="invalid environment variable: =x"):
        env(rootfs, env=("=x",))


def test_home_set_by_the_image_or_a_flag_stays(rootfs):
    assert env(rootfs, {"Cmd": ["x"], "Env": ["HOME=/data"]})[-1] == "HOME=/data"
    assert [e for e in env(rootfs, env=("HOME=/w",)) if e.startswith("HOME")] == ["HOME=/w"]


# The working directory.

def test_working_directory(rootfs):
    assert spec(rootfs)["process"]["cwd"] == "/"
    assert spec(rootfs, {"Cmd": ["x"], "WorkingDir": "/data"})["process"]["cwd"] == "/data"
    assert spec(rootfs, {"Cmd": ["x"], "WorkingDir": "/data"}, workdir="/srv/app/")["process"]["cwd"] == "/srv/app"
    with pytest.raises(SpecError, match="'srv' is invalid: it needs to be an absolute path"):
        spec(rootfs, workdir="srv")


# The user, through the image's /etc/passwd and /etc/group.

def test_root_by_default(rootfs):
    assert user(rootfs) == (0, 0, [0], "HOME=/root")


def test_a_name_takes_its_uid_gid_home_and_groups(rootfs):
    assert user(rootfs, user="nobody") == (65534, 65534, [65534], "HOME=/nonexistent")
    assert user(rootfs, user="redis") == (999, 999, [999, 4, 50], "HOME=/home/redis")


def test_a_known_uid_is_that_user(rootfs):
    assert user(rootfs, user="1") == (1, 1, [1, 50], "HOME=/usr/sbin")


def test_an_unknown_uid_stands_for_itself(rootfs):
    assert user(rootfs, user="4242") == (4242, 0, [0], "HOME=/")
    assert user(rootfs, user="4242:4343") == (4242, 4343, [4343], "HOME=/")


def test_a_named_group_replaces_the_gid_and_the_additional_groups(rootfs):
    assert user(rootfs, user="redis:staff") == (999, 50, [50], "HOME=/home/redis")
    assert user(rootfs, user="redis:0") == (999, 0, [0], "HOME=/home/redis")
    assert user(rootfs, user="0:nogroup") == (0, 65534, [65534], "HOME=/root")


def test_the_image_user_applies_unless_a_flag_is_given(rootfs):
    config = {"Cmd": ["redis-server"], "User": "redis"}
    assert user(rootfs, config)[:2] == (999, 999)
    assert user(rootfs, config, user="nobody")[:2] == (65534, 65534)


def test_an_unknown_name_is_an_error_naming_it(rootfs):
    with pytest.raises(SpecError, match="^unable to find user ghost: no matching entries in the image's /etc/passwd$"):
        user(rootfs, user="ghost")
    with pytest.raises(SpecError, match="^unable to find group wheel: .* /etc/group$"):
        user(rootfs, user="redis:wheel")


def test_without_passwd_only_numbers_resolve(rootfs):
    (rootfs / "etc" / "passwd").unlink()
    with pytest.raises(SpecError, match="unable to find user redis"):
        user(rootfs, {"Cmd": ["x"], "User": "redis"})
    assert user(rootfs, user="999:50") == (999, 50, [50], "HOME=/")


def test_the_first_matching_line_wins_and_malformed_lines_are_skipped(rootfs):
    (rootfs / "etc" / "passwd").write_text("# a comment\nbroken\nweird:x:notanumber:1::/:/bin/sh\n"
                                          "app:x:1000:1000::/home/app:/bin/sh\napp:x:2000:2000::/other:/bin/sh\n"
                                          "short:x:3000:3000\n")
    assert user(rootfs, user="app") == (1000, 1000, [1000], "HOME=/home/app")
    assert user(rootfs, user="short") == (3000, 3000, [3000], "HOME=/")
    with pytest.raises(SpecError, match="unable to find user weird"):
        user(rootfs, user="weird")


def test_an_id_out_of_range_is_an_error(rootfs):
    with pytest.raises(SpecError, match="uid 4294967296 is out of range"):
        user(rootfs, user="4294967296")


def test_passwd_is_read_inside_the_rootfs_only(rootfs, tmp_path):
    """An image's etc/passwd linking out of the rootfs is resolved inside it, not on the host."""
    (tmp_path / "host-passwd").write_text("intruder:x:7:7::/:/bin/sh\n")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to(tmp_path / "host-passwd")
    with pytest.raises(SpecError, match="unable to find user intruder"):
        user(rootfs, user="intruder")


# Volumes.

def binds(config: dict) -> list[dict]:
    return [m for m in config["mounts"] if m["type"] == "bind" and m["destination"] not in ("/etc/hosts",
                                                                                            "/etc/resolv.conf")]


def test_volumes_are_recursive_binds(rootfs, tmp_path):
    config = spec(rootfs, volumes=(f"{tmp_path}/:/data", f"{tmp_path}:/ro:ro", f"{tmp_path}:/rw:rw"))
    assert binds(config) == [
        {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind", "rprivate"]},
        {"destination": "/ro", "type": "bind", "source": str(tmp_path), "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/rw", "type": "bind", "source": str(tmp_path), "options": ["rbind", "rprivate"]},
    ]


def test_a_file_can_be_a_volume(rootfs, tmp_path):
    (tmp_path / "motd").write_text("hi")
    assert binds(spec(rootfs, volumes=(f"{tmp_path}/motd:/etc/motd:ro",)))[0]["source"] == f"{tmp_path}/motd"


def test_volumes_mount_parents_first_after_the_defaults(rootfs, tmp_path):
    config = spec(rootfs, volumes=(f"{tmp_path}:/a/b/c", f"{tmp_path}:/a", f"{tmp_path}:/z/y"))
    assert [m["destination"] for m in binds(config)] == ["/a", "/z/y", "/a/b/c"]
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations.index("/proc") < destinations.index("/a")


def test_a_volume_replaces_a_default_mount(rootfs, tmp_path):
    mounts = spec(rootfs, volumes=(f"{tmp_path}:/dev/shm",))["mounts"]
    assert [m["type"] for m in mounts if m["destination"] == "/dev/shm"] == ["bind"]


def test_a_volume_over_a_host_name_file_replaces_it(rootfs, tmp_path):
    (tmp_path / "hosts").write_text("10.0.0.1 db\n")
    mounts = spec(rootfs, volumes=(f"{tmp_path}/hosts:/etc/hosts:ro",))["mounts"]
    assert [m["source"] for m in mounts if m["destination"] == "/etc/hosts"] == [f"{tmp_path}/hosts"]


@pytest.mark.parametrize("volume, message", [
    ("data:/data", "the host path must be absolute"),
    ("/no/such/kura/path:/data", "/no/such/kura/path does not exist"),
    ("{tmp}:data", "the container path must be absolute"),
    ("{tmp}:/", "the container path cannot be /"),
    ("{tmp}:/data:rx", "the mode is ro or rw, not 'rx'"),
    ("{tmp}", "use HOST:CTR or HOST:CTR:ro"),
    ("{tmp}:/a:ro:z", "use HOST:CTR or HOST:CTR:ro"),
    ("{tmp}::ro", "use HOST:CTR or HOST:CTR:ro"),
])
def test_bad_volumes_are_one_line_errors(rootfs, tmp_path, volume, message):
    volume = volume.format(tmp=tmp_path)
    with pytest.raises(SpecError, match=f"^invalid volume '{volume}': .*") as caught:
        spec(rootfs, volumes=(volume,))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_mount_point_twice_is_an_error(rootfs, tmp_path):
    with pytest.raises(SpecError, match="duplicate mount point: /data"):
        spec(rootfs, volumes=(f"{tmp_path}:/data", f"{tmp_path}:/data/:ro"))


# Network, hostname, and what stays as runc's defaults.

def namespaces(config: dict) -> list[str]:
    return [ns["type"] for ns in config["linux"]["namespaces"]]


def test_host_network_shares_the_namespace_and_the_name_files(rootfs):
    config = spec(rootfs)
    assert "network" not in namespaces(config)
    assert set(namespaces(config)) == {"pid", "ipc", "uts", "mount"}
    host_files = {m["destination"]: m for m in config["mounts"] if m["destination"].startswith("/etc/")}
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        if os.path.exists(path):
            assert host_files.pop(path) == {"destination": path, "type": "bind", "source": path,
                                            "options": ["rbind", "rprivate", "ro"]}
    assert host_files == {}


def test_no_network_is_a_new_namespace_with_the_image_files(rootfs):
    config = spec(rootfs, network="none")
    assert "network" in namespaces(config)
    assert not [m for m in config["mounts"] if m["type"] == "bind"]


def test_an_unknown_network_is_an_error(rootfs):
    with pytest.raises(SpecError, match="unknown network 'bridge': use host or none"):
        spec(rootfs, network="bridge")


def test_hostname_is_the_flag_else_the_given_one(rootfs):
    config = spec(rootfs)
    assert config["hostname"] == "0123456789ab" and "uts" in namespaces(config)
    config = spec(rootfs, hostname="web")
    assert config["hostname"] == "web"
    assert "HOSTNAME=web" in config["process"]["env"]


def test_root_path_is_absolute(rootfs, monkeypatch):
    assert spec(rootfs)["root"] == {"path": str(rootfs), "readonly": False}
    monkeypatch.chdir(rootfs.parent)
    assert spec(Path("rootfs"))["root"]["path"] == str(rootfs)


def test_runcs_defaults_are_kept(rootfs):
    config = spec(rootfs)
    process = config["process"]
    assert process["terminal"] is False
    assert process["noNewPrivileges"] is True
    assert process["capabilities"]["bounding"] == list(CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["effective"]
    assert {"/proc", "/dev", "/dev/pts", "/sys"} <= {m["destination"] for m in config["mounts"]}
    assert "/proc/kcore" in config["linux"]["maskedPaths"]


def test_interactive_changes_nothing_in_the_spec(rootfs):
    assert spec(rootfs, interactive=True) == spec(rootfs)


def test_labels_become_annotations(rootfs):
    config = spec(rootfs, {"Cmd": ["x"], "Labels": {"org.opencontainers.image.version": "7.2"}})
    assert config["annotations"] == {"org.opencontainers.image.version": "7.2"}


def test_a_malformed_image_config_is_a_spec_error(rootfs):
    with pytest.raises(SpecError, match="config.Env is not a list of strings"):
        spec(rootfs, {"Cmd": ["x"], "Env": "A=1"})
