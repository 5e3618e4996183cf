"""S3 requests per registry operation: `python -m tests.s3_roundtrips`.

`measure_roundtrips(base_url, counter)` works against any registry on S3 whose S3 traffic the
`counter` sees (an object with `count() -> int`, and optionally `operations_since(mark) ->
collections.Counter` for the breakdown; tests.support.s3_counter.CountingProxy has both). It first
pushes a small image (not measured), then for each operation does it once to warm up (connections,
caches) and once measured: the number of S3 requests is the change of the counter around that one
operation, read after the counter has been still for `settle` seconds, so requests the registry
makes just after answering are counted too.

Run as a module, it starts SeaweedFS and the reference registry (docker-registry, `s3` driver) on
it in three configurations (see reference_registries; with a redirect to a presigned URL, the
client's GET from S3 is counted as well), and prints the table. measure_on_seaweedfs takes any
other registries to put beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OPERATIONS = ("manifest GET by tag", "manifest PUT", "blob HEAD", "blob GET", "1 MiB monolithic upload",
              "tag list")


@dataclass
class Roundtrip:
    operation: str
    requests: int
    breakdown: Counter = field(default_factory=Counter)
    client_status: str = ""  # what the registry client saw, e.g. "200" or "307 -> 200"

    def describe(self) -> str:
        detail = ", ".join(f"{name} {n}" for name, n in sorted(self.breakdown.items(), key=lambda kv: (-kv[1], kv[0])))
        redirected = f" [client saw {self.client_status}]" if "307" in self.client_status else ""
        return (f"{self.requests} ({detail})" if detail else str(self.requests)) + redirected


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def wait_still(counter, settle: float) -> int:
    """The counter's value once it has not moved for `settle` seconds (at most 10 s of waiting)."""
    value, since, deadline = counter.count(), time.monotonic(), time.monotonic() + 10
    while time.monotonic() - since < settle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = counter.count()
        if now != value:
            value, since = now, time.monotonic()
    return value


class _Registry:
    """The few distribution-API calls measured, each checking its answer."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, repo: str):
        self.session, self.base, self.repo = session, base_url.rstrip("/"), repo

    def _url(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    async def upload(self, data: bytes) -> str:
        """POST, then one PUT with the whole body and the digest."""
        digest = digest_of(data)
        async with self.session.post(self._url(f"/v2/{self.repo}/blobs/uploads/")) as r:
            assert r.status == 202, (r.status, await r.text())
            location = r.headers["Location"]
        separator = "&" if "?" in location else "?"
        async with self.session.put(self._url(f"{location}{separator}digest={digest}"), data=data,
                                    headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201, (r.status, await r.text())
        return digest

    async def put_manifest(self, reference: str, manifest: bytes) -> str:
        async with self.session.put(f"{self.base}/v2/{self.repo}/manifests/{reference}", data=manifest,
                                    headers={"Content-Type": OCI_MANIFEST}) as r:
            assert r.status == 201, (r.status, await r.text())
            return "201"

    async def get_manifest(self, reference: str, expected: bytes) -> str:
        async with self.session.get(f"{self.base}/v2/{self.repo}/manifests/{reference}",
                                    headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}) as r:
            assert r.status == 200 and await r.read() == expected, (r.status, await r.text())
            return "200"

    async def head_blob(self, digest: str, size: int) -> str:
        async with self.session.head(f"{self.base}/v2/{self.repo}/blobs/{digest}", allow_redirects=False) as r:
            assert r.status in (200, 307), r.status
            if r.status == 200:
                assert int(r.headers["Content-Length"]) == size
            return str(r.status)

    async def get_blob(self, digest: str) -> str:
        async with self.session.get(f"{self.base}/v2/{self.repo}/blobs/{digest}") as r:
            body = await r.read()
            assert r.status == 200 and digest_of(body) == digest, (r.status, len(body))
            return " -> ".join([*(str(h.status) for h in r.history), str(r.status)])

    async def tags(self, expected: set[str]) -> str:
        async with self.session.get(f"{self.base}/v2/{self.repo}/tags/list") as r:
            assert r.status == 200, r.status
            assert expected <= set((await r.json())["tags"] or [])
            return "200"


def image_manifest(config: bytes, layer: bytes, note: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(layer),
                    "size": len(layer)}],
        "annotations": {"org.opencontainers.image.description": note},
    }).encode()


async def measure_roundtrips(base_url: str, counter, *, repo: str = "roundtrip/app",
                             settle: float = 0.3) -> list[Roundtrip]:
    """S3 requests of each operation in OPERATIONS against the registry at `base_url`
    (http://127.0.0.1:PORT, no auth), as seen by `counter`."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = os.urandom(1 << 20)
    manifest = image_manifest(config, layer, "v1")
    results = []
    async with aiohttp.ClientSession(trust_env=False) as session:
        registry = _Registry(session, base_url, repo)
        # The image every read below finds (not measured).
        await registry.upload(config)
        await registry.upload(layer)
        await registry.put_manifest("v1", manifest)
        layer_digest = digest_of(layer)

        async def monolithic_upload() -> str:
            await registry.upload(os.urandom(1 << 20))
            return "202, 201"

        manifests = iter([image_manifest(config, layer, note) for note in ("warm", "measured")])
        tags = iter(["warm", "v2"])
        steps = {
            "manifest GET by tag": lambda: registry.get_manifest("v1", manifest),
            "manifest PUT": lambda: registry.put_manifest(next(tags), next(manifests)),
            "blob HEAD": lambda: registry.head_blob(layer_digest, len(layer)),
            "blob GET": lambda: registry.get_blob(layer_digest),
            "1 MiB monolithic upload": monolithic_upload,
            "tag list": lambda: registry.tags({"v1", "warm", "v2"}),
        }
        for operation in OPERATIONS:
            await steps[operation]()  # warm-up
            before = await wait_still(counter, settle)
            status = await steps[operation]()
            after = await wait_still(counter, settle)
            breakdown = counter.operations_since(before) if hasattr(counter, "operations_since") else Counter()
            results.append(Roundtrip(operation, after - before, breakdown, status))
    return results


def format_table(columns: dict[str, list[Roundtrip]], breakdown: bool = False) -> str:
    """A markdown table: one row per operation, one column per measured registry; with
    `breakdown`, each cell also names the S3 operations and any redirect the client saw."""
    names = list(columns)
    lines = ["| operation | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, operation in enumerate(OPERATIONS):
        cells = []
        for name in names:
            roundtrip = columns[name][i]
            assert roundtrip.operation == operation
            cells.append(roundtrip.describe() if breakdown else str(roundtrip.requests))
        lines.append(f"| {operation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_registries() -> dict:
    """Name -> starter(bucket, workdir) -> Server, for the reference registry's configurations:
    Debian's stock one (blob descriptors cached in memory, and the s3 driver's default redirect of
    blob GETs and HEADs to presigned URLs), then without redirect, then without cache either."""
    from tests.support.reference_s3 import start_reference_s3

    def starter(**options):
        return lambda bucket, workdir: start_reference_s3(workdir, bucket, **options)

    return {
        "reference (stock: cache, redirect)": starter(redirect=True, blobdescriptor="inmemory"),
        "reference (cache, no redirect)": starter(redirect=False, blobdescriptor="inmemory"),
        "reference (no cache, no redirect)": starter(redirect=False, blobdescriptor="none"),
    }


def kura_registries() -> dict:
    """Name -> starter(bucket, workdir) -> Server for Kura's S3 configurations."""
    from tests.support.kura_s3 import start_kura_s3

    return {
        "kura": lambda bucket, workdir: start_kura_s3(bucket, workdir),
        "kura (redirect)": lambda bucket, workdir: start_kura_s3(bucket, workdir, redirect=True),
    }


def measure_on_seaweedfs(registries: dict, work: Path, settle: float = 0.3) -> dict[str, list[Roundtrip]]:
    """For each starter(bucket, workdir) -> tests.support.servers.Server: a fresh bucket on one
    SeaweedFS, a CountingProxy in front of it, the registry started on the bucket as reached
    through the proxy, measured, stopped. A Kura column is one more starter (start `kura serve`
    with [storage.s3] endpoint/bucket/keys/region taken from the bucket it is given)."""
    from tests.support.s3_counter import CountingProxy
    from tests.support.seaweedfs import SeaweedFS
    from tests.support.servers import stop

    columns: dict[str, list[Roundtrip]] = {}
    with SeaweedFS(work / "seaweedfs") as seaweedfs:
        for index, (name, start) in enumerate(registries.items()):
            bucket = seaweedfs.new_bucket(f"roundtrips-{index}")
            with CountingProxy(bucket.endpoint) as proxy:
                registry = start(proxy.via(bucket), work / f"registry-{index}")
                try:
                    columns[name] = asyncio.run(measure_roundtrips(registry.url, proxy, settle=settle))
                finally:
                    stop(registry)
    return columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=0.3, help="seconds the counter must stay still")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="s3-roundtrips-"))
    try:
        columns = measure_on_seaweedfs({**kura_registries(), **reference_registries()}, work, args.settle)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("S3 requests per operation (SeaweedFS, counted by a proxy in front of its S3 port; with a\n"
          "redirect, the client's own GET of the presigned URL is counted too):\n")
    print(format_table(columns))
    for name, roundtrips in columns.items():
        print(f"\n{name}:")
        for roundtrip in roundtrips:
            print(f"  {roundtrip.operation}: {roundtrip.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
