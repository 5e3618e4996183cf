"""Mistakes a new user makes with the transfer commands end in one line, before any transfer:
`--jobs 0`, an `--output` that cannot be written, a missing layout directory, a registry name
that does not resolve (no retries for that), and `-v` says what is being retried and why."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ocispec.reference import Reference
from puller.progress import Progress
from puller.pull import PullOptions, pull
from puller.registries import Registries
from puller.store import Store
from tests.support.cli import run_kura
from tests.support.faulty_registry import Faults, make_app
from tests.support.paths import REPO

LAYER = os.urandom(64 * 1024)


def kura(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("command", [["pull", "127.0.0.1:9/x:1"], ["push", "oci:/nowhere:1", "127.0.0.1:9/x:1"]])
@pytest.mark.parametrize("jobs", ["0", "-2", "many"])
def test_jobs_must_be_at_least_one(command, jobs):
    result = kura(*command, "--jobs", jobs)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"kura {command[0]}: ") and "--jobs" in result.stderr and "at least 1" in result.stderr


async def test_bad_output_is_refused_before_anything_is_downloaded(aiohttp_server, tmp_path):
    faults = Faults()
    server = await aiohttp_server(make_app(LAYER, faults))
    reference = f"127.0.0.1:{server.port}/app:v1"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    store = tmp_path / "store"
    for output, says in (("foo:bar", "unsupported output 'foo:bar'"),
                         (f"oci:{a_file}/layout", f"{a_file} is not a directory"),
                         (f"docker-archive:{tmp_path}/no-such-dir/image.tar", f"{tmp_path}/no-such-dir does not exist"),
                         (f"docker-archive:{a_file}/image.tar", f"{a_file} is not a directory"),
                         ("docker-archive:", "docker-archive: output needs a file name")):
        ran = await run_kura("pull", reference, "--output", output, "--store", str(store), "-q")
        assert ran.returncode == 1, ran.stderr
        assert ran.stderr.startswith("kura: ") and says in ran.stderr and len(ran.stderr.splitlines()) == 1, \
            ran.stderr
    assert faults.requests == []  # not even the manifest was asked for
    assert Store(store).images() == []
    ran = await run_kura("pull", reference, "--output", f"oci:{tmp_path}/new/layout:v1", "--store", str(store), "-q")
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "new" / "layout" / "index.json").exists()


@pytest.mark.parametrize("command", ["push", "copy"])
def test_missing_layout_directory_is_named(command, tmp_path):
    missing = tmp_path / "no-such-layout"
    result = kura(command, f"oci:{missing}:7", "127.0.0.1:9/x:1")
    assert result.returncode == 1
    assert result.stderr == f"kura: {missing} does not exist (oci:DIR[:TAG] needs an OCI image layout directory)\n"


def test_unknown_host_fails_at_once(tmp_path):
    """No retries for a name that does not resolve (they took 8 silent seconds). Lookups are kept
    on this machine by tests.support.no_dns; every one is counted."""
    lookups = tmp_path / "lookups"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tests.support.no_dns", "pull", "no-such-host.invalid/app:1",
                             "--store", str(tmp_path / "store")], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, KURA_TEST_LOOKUPS=str(lookups)))
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr == "kura: cannot resolve no-such-host.invalid: Name or service not known\n"
    assert lookups.read_text().split() == ["no-such-host.invalid"]
    assert elapsed < 6  # the retries alone used to wait 7.5 s


class Recorder(Progress):
    def __init__(self):
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


async def test_verbose_says_what_is_retried_and_why(aiohttp_server, tmp_path):
    server = await aiohttp_server(make_app(LAYER, Faults(unavailable_once=True)))
    reference = Reference.parse(f"127.0.0.1:{server.port}/app:v1")
    recorder = Recorder()
    await pull(reference, Store(tmp_path / "a"), Registries(), lambda host: None,
               PullOptions(progress=recorder, verbose=True))
    assert recorder.messages == [f"retrying GET /v2/app/manifests/v1 on 127.0.0.1:{server.port} in 0.5 s "
                                 "(attempt 2 of 5): HTTP 503"]
    quiet = Recorder()
    server = await aiohttp_server(make_app(LAYER, Faults(unavailable_once=True)))
    await pull(Reference.parse(f"127.0.0.1:{server.port}/app:v1"), Store(tmp_path / "b"), Registries(),
               lambda host: None, PullOptions(progress=quiet))
    assert quiet.messages == []



async def test_copy_all_platforms_into_a_docker_archive_is_refused_before_any_transfer(aiohttp_server, tmp_path):
    """A docker-archive holds one platform: say so before pulling anything (as pull does)."""
    faults = Faults()
    server = await aiohttp_server(make_app(LAYER, faults))
    ran = await run_kura("copy", "--all-platforms", f"127.0.0.1:{server.port}/app:v1",
                         f"docker-archive:{tmp_path / 'out.tar'}")
    assert ran.returncode != 0 and "docker-archive holds one platform" in ran.stderr
    assert len(ran.stderr.splitlines()) == 1
    assert not [r for r in faults.requests if "blob" in r or "manifest" in r]
