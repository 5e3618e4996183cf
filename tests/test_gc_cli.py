"""`kura gc` (a real process beside the in-process registry) and the periodic collection
of `kura serve`."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time

from storage import FilesystemDriver
from tests.support.cli import run_kura, start_kura
from tests.test_gc import age_store, blob_path, delete, push, stored_blobs


async def doomed_store(client, root):
    """A store with one deleted image (old) and one kept: (deleted image, kept image)."""
    gone = await push(client, "gone", "v1", layers=[b"only in the deleted image"])
    kept = await push(client, "kept", "v1", layers=[b"kept layer"])
    await delete(client, "gone", gone.digest)
    age_store(root)
    return gone, kept


async def test_gc_json_report(client, config):
    root = config.root
    gone, kept = await doomed_store(client, root)
    sizes = {d: blob_path(root, d).stat().st_size for d in gone.blobs}

    ran = await run_kura("gc", "--root", str(root), "--json", "--dry-run")
    assert ran.returncode == 0, ran.stderr
    dry = json.loads(ran.stdout)
    assert stored_blobs(root) >= gone.blobs  # nothing removed

    ran = await run_kura("gc", "--root", str(root), "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert set(report) == {"dry_run", "skipped", "tags", "manifests", "layer_links", "blobs", "repositories",
                           "uploads", "temp_files", "bytes_freed", "duration_seconds"}
    assert (report["dry_run"], report["skipped"], dry["dry_run"]) == (False, False, True)
    assert {b["digest"]: b["size"] for b in report["blobs"]} == sizes
    assert report["bytes_freed"] == dry["bytes_freed"] == sum(sizes.values())
    assert {(link["repository"], link["digest"]) for link in report["layer_links"]} == {
        ("gone", gone.config), ("gone", gone.layers[0])}
    assert report["repositories"] == ["gone"] and report["manifests"] == report["tags"] == []
    assert isinstance(report["uploads"], int) and isinstance(report["temp_files"], int)
    assert dry["uploads"] is None and isinstance(report["duration_seconds"], float)
    for key in ("blobs", "layer_links", "repositories"):
        assert dry[key] == report[key]
    assert stored_blobs(root) == kept.blobs


async def test_gc_text_output_and_config_file(client, config, tmp_path):
    root = config.root
    gone, kept = await doomed_store(client, root)
    cfg = tmp_path / "kura.toml"
    cfg.write_text(f'[storage]\nroot = "{root}"\n[gc]\ngrace_seconds = 86400\n')
    ran = await run_kura("gc", "--config", str(cfg))
    assert ran.returncode == 0, ran.stderr
    assert "freed 0 bytes: 0 blob(s)" in ran.stdout  # all of it is younger than a day

    ran = await run_kura("gc", "--root", str(root), "--dry-run")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert f"would remove blob {gone.layers[0]} ({len(b'only in the deleted image')} bytes)" in lines
    assert f"would remove blob link gone -> {gone.config}" in lines
    assert "would remove empty repository gone" in lines
    assert lines[-1].startswith("would free ")
    assert stored_blobs(root) >= gone.blobs

    ran = await run_kura("gc", "--root", str(root))
    assert ran.returncode == 0, ran.stderr
    assert f"removed blob {gone.digest} ({len(gone.data)} bytes)" in ran.stdout.splitlines()
    assert ran.stdout.splitlines()[-1].startswith("freed ")
    assert stored_blobs(root) == kept.blobs


async def test_gc_refuses_a_directory_that_is_no_store(tmp_path):
    ran = await run_kura("gc", "--root", str(tmp_path / "nothing"))
    assert ran.returncode == 1 and ran.stderr == f"kura: {tmp_path / 'nothing'} is not a Kura store (no blobs/ directory)\n"
    assert not (tmp_path / "nothing").exists()


async def wait_until_collecting(root, timeout: float = 20) -> None:
    """Until some process holds the one-collection-at-a-time lock (locks/gc-run)."""
    lock = FilesystemDriver(root).layout.gc_run
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            finally:
                os.close(fd)
        await asyncio.sleep(0.02)
    raise TimeoutError("no collection started")


async def test_two_concurrent_collections_one_runs(client, config):
    root = config.root
    gone, kept = await doomed_store(client, root)
    server = FilesystemDriver(root)
    # A push in progress holds the first collection at its start (it waits for the push's
    # checks to end), with the one-at-a-time lock taken.
    async with server.reference_guard():
        first = await start_kura("gc", "--root", str(root), "--json")
        await wait_until_collecting(root)
        second = await run_kura("gc", "--root", str(root), "--json")
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["skipped"] is True and json.loads(second.stdout)["blobs"] == []
        assert stored_blobs(root) >= gone.blobs
    out, err = await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0, err
    report = json.loads(out)
    assert report["skipped"] is False and {b["digest"] for b in report["blobs"]} == gone.blobs
    text = await run_kura("gc", "--root", str(root))
    assert text.returncode == 0 and "nothing done" not in text.stdout


async def test_kura_serve_collects_periodically(make_client, config):
    client = await make_client(gc_interval_seconds=1)
    gone = await push(client, "gone", "v1", layers=[b"periodically collected"])
    kept = await push(client, "kept", "v1", layers=[b"kept"])
    await delete(client, "gone", gone.digest)
    age_store(config.root)

    async def catalog():
        return (await (await client.get("/v2/_catalog")).json())["repositories"]

    deadline = time.monotonic() + 30
    while (stored_blobs(config.root) & gone.blobs or await catalog() != ["kept"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not stored_blobs(config.root) & gone.blobs
    assert stored_blobs(config.root) >= kept.blobs
    assert await catalog() == ["kept"]
    assert await FilesystemDriver(config.root).last_collection() is not None


async def test_no_periodic_collection_when_off(make_client, config):
    client = await make_client(gc_interval_seconds=0, upload_purge_interval_seconds=1)
    gone = await push(client, "gone", "v1")
    await delete(client, "gone", gone.digest)
    age_store(config.root)
    await asyncio.sleep(1.5)
    assert stored_blobs(config.root) >= gone.blobs
    assert await FilesystemDriver(config.root).last_collection() is None
