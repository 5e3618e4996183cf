"""`kura diff` and `kura run`'s runtime config on real runc, as root: what a container did to its
overlay read back as `docker diff` lines (a deleted directory, one removed and made again, new
trees), the shared lower directory untouched, and each option's effect seen from inside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import client_env
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.runc import skip_without_runc
from tests.support.servers import start_kura, stop
from tests.test_e2e_unpack import tree  # type, mode, owner, link target or content of each entry

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kura(tmp_path_factory):
    skip_without_runc()
    require_shared()
    work = tmp_path_factory.mktemp("diff")
    server = start_kura(work / "registry")
    try:
        subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{IMAGES / 'debian'}:bookworm", f"docker://{server.host}/library/debian:bookworm"],
                       check=True, capture_output=True, timeout=300)
        environment = dict(client_env(work / "home"), PYTHONPATH=str(REPO))
        store = work / "store"

        def run(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "kura", args[0], "--store", str(store), *args[1:]],
                                  cwd="/", capture_output=True, text=True, timeout=300,
                                  env=dict(environment, **(extra_env or {})))
        run.debian = f"{server.host}/library/debian:bookworm"
        run.store = store
        pulled = run("run", "--rm", "-q", run.debian, "true")
        assert pulled.returncode == 0, pulled.stderr
        yield run
        ids = run("ps", "-aq").stdout.split()
        if ids:
            run("rm", "-f", *ids)
    finally:
        stop(server)


def test_diff_reads_deletions_opaque_directories_and_new_trees(kura):
    [lower] = (kura.store / "containers" / "lowers").iterdir()
    before = tree(lower)
    apt = sorted(os.listdir(lower / "etc" / "apt"))
    script = ("touch /tmp/new && rm /etc/issue.net && echo x >> /etc/motd && rm -r /etc/default && "
              "rm -rf /etc/apt && mkdir -p /etc/apt/keyrings && touch /etc/apt/keyrings/k.gpg && "
              "mkdir -p /srv/a/b && touch /srv/a/b/c")
    ran = kura("run", "--name", "d1", kura.debian, "sh", "-c", script)
    assert ran.returncode == 0, ran.stderr
    diff = kura("diff", "d1")
    assert diff.returncode == 0, diff.stderr
    assert "keyrings" in apt  # in the image: changed, its old contents deleted
    old_keyrings = sorted(os.listdir(lower / "etc" / "apt" / "keyrings"))
    expected = (["C /etc", "C /etc/apt"]
                + [f"D /etc/apt/{name}" for name in apt if name < "keyrings"]
                + ["C /etc/apt/keyrings"]
                + sorted([f"D /etc/apt/keyrings/{name}" for name in old_keyrings] + ["A /etc/apt/keyrings/k.gpg"])
                + [f"D /etc/apt/{name}" for name in apt if name > "keyrings"]
                + ["D /etc/default", "D /etc/issue.net", "C /etc/motd",
                   "C /srv", "A /srv/a", "A /srv/a/b", "A /srv/a/b/c", "C /tmp", "A /tmp/new"])
    assert diff.stdout.splitlines() == expected
    assert tree(lower) == before
    assert kura("rm", "d1").returncode == 0


def test_options_seen_from_inside(kura):
    """-e (with a bare key from here), -w of a directory the image lacks, -h, -u nobody,
    --network none, and HOME/HOSTNAME set as docker sets them."""
    ran = kura("run", "--rm", "-e", "GREETING=hi there", "-e", "KURA_FROM_HERE", "-w", "/work/dir",
               "-h", "box", "-u", "nobody", "--network", "none", kura.debian, "sh", "-c",
               'tr "\\0" "\\n" < /proc/1/environ; pwd; hostname; id; ls /sys/class/net',  # as runc set it
               extra_env={"KURA_FROM_HERE": "passed through"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=box",
        "GREETING=hi there", "KURA_FROM_HERE=passed through", "HOME=/nonexistent",
        "/work/dir", "box", "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)", "lo"]


def test_host_network_and_volumes(kura, tmp_path):
    """The host's interfaces and read-only /etc/hosts; a read-only volume refuses writes, a
    read-write one shows them on the host; --entrypoint replaces the image's."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "note").write_text("from the host\n")
    (tmp_path / "rw").mkdir()
    ran = kura("run", "--rm", "-v", f"{tmp_path / 'ro'}:/in:ro", "-v", f"{tmp_path / 'rw'}:/out",
               "--entrypoint", "/bin/sh", kura.debian, "-c",
               "cat /in/note; touch /in/x 2>/dev/null || echo ro refused; echo written > /out/y; "
               "echo x >> /etc/hosts 2>/dev/null || echo hosts refused; ls /sys/class/net | sort; cat /etc/hosts")
    assert ran.returncode == 0, ran.stderr
    host_net = sorted(os.listdir("/sys/class/net"))
    lines = ran.stdout.splitlines()
    assert lines[:3] == ["from the host", "ro refused", "hosts refused"]
    assert lines[3:3 + len(host_net)] == host_net
    assert "\n".join(lines[3 + len(host_net):]) + "\n" == Path("/etc/hosts").read_text()
    assert (tmp_path / "rw" / "y").read_text() == "written\n"
    assert not (tmp_path / "ro" / "x").exists()


def test_spec_errors_are_one_line_and_leave_nothing(kura):
    for args, message in ((("--entrypoint", ""), "kura: no command specified\n"),
                          (("-u", "ghost"), "kura: unable to find user ghost: no matching entries in the image's "
                                            "/etc/passwd\n"),
                          (("-v", "relative:/x"), "kura: invalid volume 'relative:/x': the host path must be "
                                                  "absolute (no named volumes)\n")):
        ran = kura("run", *args, kura.debian)
        assert (ran.returncode, ran.stderr) == (125, message)
    assert kura("ps", "-aq").stdout == ""
