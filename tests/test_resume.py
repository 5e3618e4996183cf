"""Interrupted pulls resume: the bytes received so far stay in the store's scratch area, the
next pull asks for the rest with Range and verifies the whole blob; a registry that ignores
Range, a damaged or overlong partial file, concurrent pulls of one blob and old abandoned
partial files are all handled."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from pathlib import Path

import pytest

from ocispec.digest import Digest
from ocispec.reference import Reference
from puller.pull import PullOptions, pull
from puller.registries import Registries
import puller.store as store_module
from puller.store import Store
from tests.support.cli import run_kura, start_kura
from tests.support.faulty_registry import Faults, make_app, sha256

LAYER = os.urandom(8 * 1024 * 1024 + 5)
LAYER_DIGEST = Digest.parse(sha256(LAYER))


@pytest.fixture
def children():
    """`kura` processes a test starts; any still running when it ends (a failed test) is killed."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


def layer_requests(faults: Faults) -> list[str]:
    """The Range of each request for the layer (None: the whole blob)."""
    prefix = f"GET blob {sha256(LAYER)[:15]} range="
    return [r[len(prefix):] for r in faults.requests if r.startswith(prefix)]


def scratch_files(store: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in (store / ".kura").rglob("*") if p.is_file()}


async def wait_for_partial(store: Path, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(size >= at_least for size in scratch_files(store).values()):
        assert time.monotonic() < deadline, "the pull never wrote a partial file"
        await asyncio.sleep(0.05)


def installed(store: Path) -> bytes:
    return (store / "blobs" / "sha256" / LAYER_DIGEST.encoded).read_bytes()


async def run_pull(server, store: Store):
    return await pull(Reference.parse(f"127.0.0.1:{server.port}/app:v1"), store, Registries(), lambda host: None,
                      PullOptions())


async def test_pull_interrupted_with_ctrl_c_resumes_with_range(aiohttp_server, tmp_path, children):
    faults = Faults(stall_after=3 << 20)
    server = await aiohttp_server(make_app(LAYER, faults))
    reference, store = f"127.0.0.1:{server.port}/app:v1", tmp_path / "store"
    first = await start_kura("pull", reference, "--store", str(store), "-q")
    children.append(first)
    await wait_for_partial(store, 1 << 20)
    first.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(first.communicate(), 30)
    assert first.returncode == 130, err
    assert err.decode() == "kura: interrupted\n"
    kept = max(scratch_files(store).values())
    assert kept >= 1 << 20
    faults.released.set()
    faults.stall_after = None
    faults.requests.clear()
    second = await run_kura("pull", reference, "--store", str(store), "-q")
    assert second.returncode == 0, second.stderr
    assert layer_requests(faults) == [f"bytes={kept}-"]
    assert installed(store) == LAYER
    assert not [p for p in scratch_files(store) if p.name != "lock" and not p.name.endswith(".lock")
                and p.name != "sources.json"]


async def test_a_registry_that_ignores_range_restarts_from_zero(aiohttp_server, tmp_path):
    faults = Faults(ignore_range=True)
    server = await aiohttp_server(make_app(LAYER, faults))
    store = Store(tmp_path / "store")
    partial = store.partial_path(LAYER_DIGEST)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(LAYER[:1 << 20])
    await run_pull(server, store)
    assert layer_requests(faults) == [f"bytes={1 << 20}-"]  # answered with 200 and the whole blob
    assert installed(store.root) == LAYER and not partial.exists()


async def test_a_damaged_partial_file_is_downloaded_again(aiohttp_server, tmp_path):
    faults = Faults()
    server = await aiohttp_server(make_app(LAYER, faults))
    store = Store(tmp_path / "store")
    partial = store.partial_path(LAYER_DIGEST)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(os.urandom(1 << 20))  # not the blob's first MiB
    await run_pull(server, store)
    assert layer_requests(faults) == [f"bytes={1 << 20}-", "None"]  # resumed, failed verification, restarted
    assert installed(store.root) == LAYER and not partial.exists()


async def test_a_partial_file_longer_than_the_blob_is_discarded(aiohttp_server, tmp_path):
    faults = Faults()
    server = await aiohttp_server(make_app(LAYER, faults))
    store = Store(tmp_path / "store")
    partial = store.partial_path(LAYER_DIGEST)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(LAYER + b"more")
    await run_pull(server, store)
    assert layer_requests(faults) == ["None"]
    assert installed(store.root) == LAYER


async def test_concurrent_pulls_of_one_blob_download_it_once(aiohttp_server, tmp_path, children):
    """The second pull waits for the first one's partial file instead of writing beside it."""
    faults = Faults(stall_after=2 << 20)
    server = await aiohttp_server(make_app(LAYER, faults))
    reference, store = f"127.0.0.1:{server.port}/app:v1", tmp_path / "store"
    first = await start_kura("pull", reference, "--store", str(store), "-q")
    children.append(first)
    await wait_for_partial(store, 1 << 20)
    second = await start_kura("pull", reference, "--store", str(store))
    children.append(second)
    seen = b""
    while b"waiting for another" not in seen:
        line = await asyncio.wait_for(second.stderr.readline(), 30)
        assert line, f"the second pull did not wait: {seen!r}"
        seen += line
    faults.released.set()  # the stalled transfer breaks off; the first pull resumes it
    faults.stall_after = None
    _, err = await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0, err
    out, err = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 0, err
    assert b"(0 downloaded, 2 already stored)" in out
    assert layer_requests(faults) == ["None", f"bytes={2 << 20}-"]  # both from the first pull
    assert installed(store) == LAYER


def test_rmi_cleans_old_partial_files_but_not_recent_or_busy_ones(tmp_path):
    store = Store(tmp_path / "store")
    store.put_bytes(b'{"layers": []}', Digest.of_bytes(b'{"layers": []}'))
    store.add("example.com/app:1", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "digest": str(Digest.of_bytes(b'{"layers": []}')), "size": 14})
    old, recent, busy = (store.partial_path(Digest.of_bytes(x)) for x in (b"old", b"recent", b"busy"))
    old.parent.mkdir(parents=True, exist_ok=True)
    for path in (old, recent, busy):
        path.write_bytes(b"some bytes")
    long_ago = time.time() - store_module.PARTIAL_MAX_AGE - 60
    for path in (old, busy):
        os.utime(path, (long_ago, long_ago))
    stale_temp = store.scratch / "0123456789abcdef.tmp"  # left by a process killed while writing
    stale_temp.write_bytes(b"x")
    os.utime(stale_temp, (long_ago, long_ago))
    with open(busy, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a pull is resuming it right now
        store.remove("example.com/app:1")
    assert not old.exists() and not stale_temp.exists()
    assert recent.exists() and busy.exists()


@pytest.mark.parametrize("kept", ["the blob", "other bytes"])
async def test_a_partial_file_holding_every_byte_is_finished_against_a_real_kura(client, tmp_path, kept):
    """A partial as long as the blob: Kura answers `Range: bytes=<size>-` with 416, so the
    partial is checked locally (installed when it matches, fetched again from 0 otherwise)."""
    from tests.conftest import push_image
    await push_image(client, "app", "v1", layer=LAYER)
    store = Store(tmp_path / "store")
    partial = store.partial_path(LAYER_DIGEST)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(LAYER if kept == "the blob" else os.urandom(len(LAYER)))
    await run_pull(client.server, store)
    assert installed(store.root) == LAYER and not partial.exists()


async def test_a_blob_that_fails_before_its_first_byte_leaves_no_partial_file(aiohttp_server, tmp_path):
    from puller.transport import RegistryError
    server = await aiohttp_server(make_app(LAYER, Faults(missing_layer=True)))
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError):
        await run_pull(server, store)
    assert not store.partial_path(LAYER_DIGEST).exists()
