"""`kura serve` refuses what it cannot use with one line naming the path or address, before
it claims to be serving: a port in use, TLS files it cannot load, a storage root it cannot
create or write, a disk too full to create the root or the token key."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.mounts import fill, remount, tmpfs
from tests.support.paths import REPO
from tests.support.servers import free_port, start_kura, stop
from tests.test_serve_options import self_signed


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)


def refused(result: subprocess.CompletedProcess) -> str:
    """The one line a refused start prints (and nothing claims it was serving)."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "serving" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kura: "), result.stderr
    return lines[0]


def test_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(serve("--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "data")))
    assert line == f"kura: cannot listen on 127.0.0.1:{port}: address already in use"


def test_tls_files_that_cannot_be_used_are_named(tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    missing = tmp_path / "missing.pem"
    listen = ("--listen", f"127.0.0.1:{free_port()}", "--root", str(tmp_path / "data"))

    def with_tls(cert_path: Path, key_path: Path) -> str:
        config = tmp_path / "tls.toml"
        config.write_text(f'[server]\ntls_cert = "{cert_path}"\ntls_key = "{key_path}"\n')
        return refused(serve("--config", str(config), *listen))

    assert with_tls(missing, key) == f"kura: cannot read the TLS certificate {missing}: no such file or directory"
    assert with_tls(tmp_path, key) == f"kura: cannot read the TLS certificate {tmp_path}: is a directory"
    assert with_tls(cert, missing) == f"kura: cannot read the TLS key {missing}: no such file or directory"
    assert with_tls(garbage, key).startswith(f"kura: {garbage} holds no PEM certificate")
    assert with_tls(cert, garbage).startswith(f"kura: {garbage} holds no usable PEM private key")
    line = with_tls(other_cert, key)
    assert line.startswith(f"kura: the TLS key {key} does not belong to the certificate {other_cert}"), line
    assert not (tmp_path / "data").exists()  # refused before the store was touched


def test_root_whose_parent_is_missing_is_refused(tmp_path):
    root = tmp_path / "no" / "such" / "data"
    line = refused(serve("--listen", f"127.0.0.1:{free_port()}", "--root", str(root)))
    assert line == (f"kura: storage root {root} does not exist, nor does its parent {root.parent}; "
                    "create it first (or fix storage.root)")
    assert not (tmp_path / "no").exists()


def test_root_that_is_a_file_is_refused(tmp_path):
    root = tmp_path / "data"
    root.write_text("")
    line = refused(serve("--listen", f"127.0.0.1:{free_port()}", "--root", str(root)))
    assert line == f"kura: storage root {root} is not a directory"


def test_read_only_root_is_refused(tmp_path):
    with tmpfs(tmp_path / "vol", "4m") as volume:
        root = volume / "data"
        server = start_kura(root, None, log=tmp_path / "first.log")  # lays out the store
        stop(server)
        remount(volume, "ro")
        listen = ("--listen", f"127.0.0.1:{free_port()}")
        line = refused(serve(*listen, "--root", str(root)))
        assert line == f"kura: storage root {root} is not writable: read-only file system"
        line = refused(serve(*listen, "--root", str(volume / "new")))
        assert line == f"kura: cannot create the storage root {volume / 'new'}: read-only file system"


def test_no_space_for_the_root_directories(tmp_path):
    # Three inodes: the volume, data/ and blobs/; the next directory finds no room.
    with tmpfs(tmp_path / "vol", "4m", "nr_inodes=3") as volume:
        root = volume / "data"
        line = refused(serve("--listen", f"127.0.0.1:{free_port()}", "--root", str(root)))
        assert line == f"kura: cannot create {root / 'repositories'}: no space left on device", line


def test_no_space_for_the_token_key(tmp_path):
    with tmpfs(tmp_path / "vol", "4m") as volume:
        root = volume / "data"
        stop(start_kura(root, None, log=tmp_path / "first.log"))
        fill(volume / "filler")
        config = tmp_path / "token.toml"
        config.write_text('[auth]\nmode = "token"\n')
        line = refused(serve("--listen", f"127.0.0.1:{free_port()}", "--root", str(root), "--config", str(config)))
        key = root / "auth" / "token-signing.key"
        assert line == f"kura: cannot create the token signing key {key}: no space left on device"
        assert [p.name for p in (root / "auth").iterdir()] == []  # no half-written key left behind


def test_full_disk_at_start_up_still_serves_pulls_with_a_warning(tmp_path):
    with tmpfs(tmp_path / "vol", "4m") as volume:
        root = volume / "data"
        stop(start_kura(root, None, log=tmp_path / "first.log"))
        fill(volume / "filler")
        log = tmp_path / "full.log"
        server = start_kura(root, None, log=log)
        stop(server)
        warnings = [line for line in log.read_text().splitlines() if " WARNING " in line]
        assert any(f"storage root {root} is full (no space left on device)" in line for line in warnings), warnings
