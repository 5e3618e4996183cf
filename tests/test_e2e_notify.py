"""Event notifications end to end: skopeo against `kura serve` and against the reference
registry (Debian's docker-registry 2.8), each configured with an endpoint on loopback.

The reference's envelope and events are the yardstick: for the same push, pull, mount and delete,
Kura sends the same actions with the same fields and values (ids, times and addresses
aside). Kura differs where it was asked to: a HEAD is no pull (the reference reports one), and
its envelopes may hold several events (the reference sends one per envelope).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import urllib.request

import pytest

from tests.support.event_receiver import EventReceiver
from tests.support.paths import IMAGES, require_shared
from tests.support.servers import (Server, distribution_config, free_port, run_distribution, start_kura, stop,
                                  wait_until_up)

pytestmark = pytest.mark.e2e

IMAGE = f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64"
ENVELOPE = "application/vnd.docker.distribution.events.v1+json"


async def skopeo(*args: str) -> None:
    proc = await asyncio.to_thread(subprocess.run, ["skopeo", *args], capture_output=True, timeout=300,
                                   stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"skopeo {' '.join(args)}: {proc.stderr.decode(errors='replace')}"


async def push_pull_delete(host: str, out: str) -> None:
    await skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{host}/a/bb:1")
    head = urllib.request.Request(f"http://{host}/v2/a/bb/manifests/1", method="HEAD",
                                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    await asyncio.to_thread(lambda: urllib.request.urlopen(head, timeout=30).close())
    await skopeo("copy", "--src-tls-verify=false", f"docker://{host}/a/bb:1", f"oci:{out}:1")
    await skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",  # mounts what it can
                 f"docker://{host}/a/bb:1", f"docker://{host}/b/bb:1")
    await skopeo("delete", "--tls-verify=false", f"docker://{host}/a/bb:1")


def kura_config(path, receiver: EventReceiver) -> str:
    path.write_text(f'[log]\naccess_log = false\n\n[[notifications]]\nurl = "{receiver.url}"\n'
                    'headers = { X-Token = ["abc"] }\nbackoff_seconds = 0.05\nmax_backoff_seconds = 0.5\n')
    return str(path)


def reference_config(workdir, port: int, receiver: EventReceiver) -> str:
    return distribution_config(workdir, port, f"""notifications:
  endpoints:
    - name: test
      url: {receiver.url}
      headers:
        X-Token: [abc]
      timeout: 5s
      threshold: 3
      backoff: 100ms
""")


def comparable(event: dict) -> tuple:
    """What must agree between Kura and the reference: the fields present and their values,
    bar what names a moment, a process or a connection."""
    target = event["target"]
    url = target.get("url", "")
    return (event["action"], event["request"]["method"], tuple(sorted(event)), tuple(sorted(target)),
            tuple(sorted(event["request"])), tuple(sorted(event["source"])), event["actor"].get("name"),
            target.get("mediaType"), target.get("digest"), target.get("size"), target.get("length"),
            target.get("repository"), target.get("fromRepository"), target.get("tag"),
            url[url.index("/v2/"):] if url else None)


async def test_kura_sends_what_the_reference_registry_sends(tmp_path):
    require_shared()
    runs = {}
    for name in ("reference", "kura"):
        receiver = await EventReceiver().start()
        try:
            if name == "kura":
                server = await asyncio.to_thread(start_kura, tmp_path / "kura" / "root", None, "--config",
                                                 kura_config(tmp_path / "kura.toml", receiver))
            else:
                port = free_port()
                process = run_distribution(tmp_path / "reference", reference_config(tmp_path / "reference", port,
                                                                                    receiver))
                await asyncio.to_thread(wait_until_up, f"http://127.0.0.1:{port}/v2/", process)
                server = Server("distribution", f"127.0.0.1:{port}", tmp_path / "reference", process)
            try:
                await push_pull_delete(server.host, str(tmp_path / f"out-{name}"))
                # push 2 blobs, manifest; pull the same; copy: pull it, mount, pull and push the config,
                # push the manifest; delete: pull it, delete it and its tag
                expected = 3 + 3 + 5 + 3
                await receiver.wait_for(expected, counted=lambda event: event["request"]["method"] != "HEAD")
                events = await receiver.settle(0.5)
            finally:
                await asyncio.to_thread(stop, server)
            runs[name] = (receiver, events)
        finally:
            await receiver.stop()

    reference, kura = runs["reference"][1], runs["kura"][1]
    heads = [e for e in reference if e["request"]["method"] == "HEAD"]
    assert [e["action"] for e in heads] == ["pull", "pull"]  # ours, and skopeo's check before it mounts  # the reference's HEAD pulls: not Kura's
    reference = [e for e in reference if e["request"]["method"] != "HEAD"]
    assert sorted(map(comparable, kura)) == sorted(map(comparable, reference))
    # In order: blobs before the manifest naming them, the deleted manifest before its tag.
    assert [e["action"] for e in kura] == [e["action"] for e in reference]
    assert [e["target"]["fromRepository"] for e in kura if e["action"] == "mount"] == ["a/bb"]
    for receiver, _ in runs.values():
        for headers, body in receiver.posts:
            assert set(body) == {"events"}
            assert headers["Content-Type"] == ENVELOPE and headers["X-Token"] == "abc"
    assert len(runs["kura"][0].posts) <= len(kura)


async def test_a_crash_and_an_endpoint_down_meanwhile_lose_nothing(tmp_path):
    """Pushes while the endpoint is down; `kura serve` is killed and starts again (with two
    workers: one delivers, the other's events wait in the store for it); then the endpoint
    comes up and gets every event once, in order, followed by those of a pull."""
    require_shared()
    receiver = EventReceiver()  # not listening yet
    config = kura_config(tmp_path / "kura.toml", receiver)
    root = tmp_path / "root"
    server = await asyncio.to_thread(start_kura, root, None, "--config", config)
    try:
        await skopeo("copy", "--dest-tls-verify=false", IMAGE, f"docker://{server.host}/a/bb:1")
        await skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                     f"docker://{server.host}/a/bb:1", f"docker://{server.host}/b/bb:2")
    finally:
        await asyncio.to_thread(stop, server, signal.SIGKILL)  # a crash: no chance to tidy up
    queued = len(list((root / "outbox").glob("*/pending/*")))
    assert queued >= 3 + 1 + 3  # push; then at least the GET of the manifest, 2 blobs (mounted) and it
    server = await asyncio.to_thread(start_kura, root, None, "--config", config, workers=2)
    try:
        await receiver.start()
        await receiver.wait_for(queued)
        await skopeo("copy", "--src-tls-verify=false", f"docker://{server.host}/b/bb:2", f"oci:{tmp_path / 'out'}:2")
        await receiver.wait_for(queued + 3)
        events = await receiver.settle(0.5)
    finally:
        await asyncio.to_thread(stop, server)
        await receiver.stop()
    assert len({e["id"] for e in events}) == len(events) == queued + 3  # each once
    described = [(e["action"], e["target"]["repository"], e["target"]["url"].split("/")[-2]) for e in events]
    assert described[:4] == [("push", "a/bb", "blobs"), ("push", "a/bb", "blobs"), ("push", "a/bb", "manifests"),
                             ("pull", "a/bb", "manifests")]
    assert ("mount", "b/bb", "blobs") in described[4:queued]
    assert described[queued - 1] == ("push", "b/bb", "manifests")
    assert described[queued:] == [("pull", "b/bb", "manifests"), ("pull", "b/bb", "blobs"), ("pull", "b/bb", "blobs")]
    assert not list((root / "outbox").glob("*/pending/*"))
