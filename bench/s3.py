"""S3: Kura's s3 driver against the reference registry's, all on one SeaweedFS (a real S3
server on loopback). Three configurations, alternated round by round (A B C A B C), each on a
fresh bucket every round: Kura alone, three Kura instances behind haproxy (one bucket, one
config, as a scaled-out deployment runs them), the reference with its s3 driver. Measured:
skopeo push and pull of the shared redis image, a 64 MiB blob upload and download (curl, as
bench/blobs.py), manifest GET by tag under wrk (c=32). No targets: the filesystem's do not
carry over to a store whose every request is a network round trip."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from tests.support.balancer import start_haproxy
from tests.support.kura_s3 import storage_toml
from tests.support.paths import IMAGES
from tests.support.reference_s3 import start_reference_s3
from tests.support.seaweedfs import SeaweedFS
from tests.support.servers import stop

from .blobs import SIZE, download, make_blob, upload_monolithic
from .clients import timed
from .context import Context, median
from .load import Load, wrk
from .results import Row
from .seeding import OCI_MANIFEST
from .servers import MIB, Running, start_kura

SECTION = "s3 (SeaweedFS)"
REFERENCE = "distribution s3"
KURA, KURA_X3 = "kura s3", "kura s3 x3"
INSTANCES = 3
# Behind a balancer every connection comes from the balancer's address (tests/support/instances.py).
BEHIND_BALANCER = "[server]\nmax_connections_per_client = 0\n"


def start_kura_s3(context: Context, workdir: Path, bucket) -> Running:
    """`kura serve` on `bucket`, access log off (bench.servers.start_kura), with the benchmark's
    --workers when given."""
    return _named(KURA, start_kura(workdir, workers=context.workers,
                                   extra_config=storage_toml(bucket, root=workdir / "data")))


def start_kura_s3_group(context: Context, workdir: Path, bucket) -> Running:
    """INSTANCES `kura serve` processes on one bucket and one config (and local root: accounts,
    token keys), each on its own port, behind haproxy (round-robin per request, no stickiness).
    Started with bench.servers.start_kura rather than tests.support.instances, whose config turns
    the access log on; --workers goes to each instance as to a single one."""
    config = storage_toml(bucket, root=workdir / "data") + BEHIND_BALANCER
    started: list[Running] = []
    try:
        for _ in range(INSTANCES):
            started.append(start_kura(workdir, workers=context.workers, extra_config=config))
        balancer = start_haproxy(workdir / "haproxy", [int(one.host.rpartition(":")[2]) for one in started])
    except BaseException:
        for one in started:
            one.stop()
        raise

    def processes() -> list[int]:
        return [pid for one in started for pid in one.processes()]

    def stop_all() -> None:
        balancer.stop()
        for one in started:
            one.stop()

    return Running(KURA_X3, balancer.host, processes, stop_all)


def start_reference(workdir: Path, bucket) -> Running:
    server = start_reference_s3(workdir, bucket)  # access log off, log level error
    pid = server.process.pid
    return Running(REFERENCE, server.host, lambda: [pid], lambda: stop(server))


def _named(name: str, running: Running) -> Running:
    return dataclasses.replace(running, name=name)


def skopeo_copy(source: str, destination: str, *flags: str) -> list[str]:
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", *flags, source, destination]


def run(context: Context) -> tuple[list[Row], dict[str, int]]:
    work = context.scratch("s3")
    starters = {KURA: lambda root, bucket: start_kura_s3(context, root, bucket),
                KURA_X3: lambda root, bucket: start_kura_s3_group(context, root, bucket),
                REFERENCE: start_reference}
    samples: dict[str, dict[str, list]] = {}
    rss: dict[str, int] = {}
    with SeaweedFS(work / "seaweedfs") as seaweedfs:
        for round_number in range(context.rounds):
            blob = work / "blob"
            digest = make_blob(blob, 1000 + round_number)
            for name, start in starters.items():  # A B C: the same machine, minutes apart at most
                # Fresh storage each round: a push to a store that already holds the layers
                # (or that skopeo's blob cache knows of) is a mount, not a push.
                root = work / f"{name.replace(' ', '-')}-{round_number}"
                registry = start(root, seaweedfs.new_bucket(f"bench-{name}"))
                try:
                    _measure(context, work, registry, blob, digest, samples)
                    rss[name] = max(rss.get(name, 0), registry.peak_rss())
                finally:
                    registry.stop()
                    shutil.rmtree(root, ignore_errors=True)
            blob.unlink()
    return _rows(samples), {"kura": max(rss[KURA], rss[KURA_X3]), "distribution": rss[REFERENCE]}


def _measure(context: Context, work: Path, registry: Running, blob: Path, digest: str,
             samples: dict[str, dict[str, list]]) -> None:
    def note(metric: str, value) -> None:
        samples.setdefault(metric, {}).setdefault(registry.name, []).append(value)

    name, pulled = "bench/redis", work / "pulled"
    note("skopeo push of redis", 1000 * timed(skopeo_copy(
        f"oci:{IMAGES / 'redis'}:7", f"docker://{registry.host}/{name}:7", "--preserve-digests")))
    note("skopeo pull of redis", 1000 * timed(skopeo_copy(f"docker://{registry.host}/{name}:7", f"oci:{pulled}:7"),
                                               [pulled]))
    shutil.rmtree(pulled, ignore_errors=True)
    note("upload 64 MiB, monolithic (c=1)", SIZE / MIB / upload_monolithic(registry, "blobs/up", blob, digest))
    note("download 64 MiB (c=1)", download(registry, "blobs/up", digest, 1))
    note("manifest GET by tag (c=32)",
         wrk(f"{registry.url}/v2/{name}/manifests/7", context.seconds, headers={"Accept": OCI_MANIFEST}))


def _rows(samples: dict[str, dict[str, list]]) -> list[Row]:
    rows = []
    for metric, by_registry in samples.items():
        reference = by_registry[REFERENCE]
        for kura_name, label in ((KURA, "Kura s3"), (KURA_X3, f"Kura s3 ×{INSTANCES} (haproxy)")):
            kura = by_registry[kura_name]
            raw = {"kura": _values(kura), "distribution s3": _values(reference)}
            if isinstance(kura[0], Load):
                mine, theirs = _median_load(kura), _median_load(reference)
                rows.append(Row(SECTION, f"{metric}, {label}", "req/s", mine.rate, theirs.rate,
                                reference_name=REFERENCE, detail=f"Kura {mine.detail}; ref {theirs.detail}",
                                samples=raw))
                continue
            unit = "ms" if metric.startswith("skopeo") else "MiB/s"
            rows.append(Row(SECTION, f"{metric}, {label}", unit, median(kura), median(reference),
                            reference_name=REFERENCE, detail=f"rounds: Kura {_listed(kura)}; ref {_listed(reference)}",
                            samples=raw))
    return rows


def _median_load(loads: list[Load]) -> Load:
    """The median run by rate (its own latencies with it)."""
    return sorted(loads, key=lambda load: load.rate)[len(loads) // 2]


def _values(values: list) -> list[float]:
    return [value.rate if isinstance(value, Load) else value for value in values]


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in values)
