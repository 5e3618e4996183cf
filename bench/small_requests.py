"""Small requests under load (wrk; ab for HEAD), c=32, Kura and the reference alternated:
manifest GET by tag, manifest PUT, tag list, blob HEAD; and the growth series (tag list at
100 / 1,000 / 10,000 tags, the catalog's first page with 100 / 10,000 repositories)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from .context import Context
from .load import Load, ab_head, wrk, wrk_put
from .results import Row
from .seeding import OCI_MANIFEST, get_manifest, mount_into, push_shared_image, put_tags
from .servers import Running, start_kura, start_reference

SECTION = "small requests"
PUSHED = "bench/pushed"  # the repository the manifest PUTs go to


def best(loads: list[Load]) -> Load:
    """The median run by rate (its own latencies with it)."""
    ordered = sorted(loads, key=lambda load: load.rate)
    return ordered[len(ordered) // 2]


def alternate(registries: list[Running], rounds: int, measure) -> dict[str, list]:
    """`measure(registry)` for each registry in turn, `rounds` times over (A B A B)."""
    runs: dict[str, list] = {}
    for _ in range(rounds):
        for registry in registries:
            runs.setdefault(registry.name, []).append(measure(registry))
    return runs


def compare(metric: str, runs: dict[str, list[Load]], target: float | None) -> Row:
    kura, reference = best(runs["kura"]), best(runs["distribution"])
    return Row(SECTION, metric, "req/s", kura.rate, reference.rate, target=target,
               detail=f"Kura {kura.detail}; ref {reference.detail}",
               samples={name: [load.rate for load in loads] for name, loads in runs.items()})


def run(context: Context) -> tuple[list[Row], dict[str, int]]:
    work = context.scratch("small")
    registries = [start_kura(work / "kura", workers=context.workers), start_reference(work / "reference")]
    try:
        return _measure(context, work, registries)
    finally:
        for registry in registries:
            registry.stop()


def _measure(context: Context, work: Path, registries: list[Running]) -> tuple[list[Row], dict[str, int]]:
    seconds = context.seconds
    for registry in registries:
        push_shared_image(registry.host)
    manifest, content_type = asyncio.run(get_manifest(registries[0].url, "library/redis", "7"))
    body = work / "manifest.json"
    body.write_bytes(manifest)
    layer = max(json.loads(manifest)["layers"], key=lambda layer: layer["size"])["digest"]
    accept = {"Accept": OCI_MANIFEST}
    document = json.loads(manifest)
    for registry in registries:
        for descriptor in [document["config"], *document["layers"]]:
            asyncio.run(mount_into(registry.url, descriptor["digest"], "library/redis", [PUSHED]))
    runs: dict[str, dict[str, list[Load]]] = {}

    def note(metric: str, registry: Running, load: Load) -> None:
        runs.setdefault(metric, {}).setdefault(registry.name, []).append(load)

    for round_number in range(context.rounds):
        for registry in registries:  # A B A B: both see the same machine, minutes apart at most
            url = registry.url
            note("manifest GET by tag", registry, wrk(f"{url}/v2/library/redis/manifests/7", seconds, headers=accept))
            note("tag list", registry, wrk(f"{url}/v2/library/redis/tags/list", seconds))
            note("blob HEAD", registry, ab_head(f"{url}/v2/library/redis/blobs/{layer}", seconds))
            # Into a repository of their own: tags pushed here must not grow the tag list above.
            note("manifest PUT (new tag each)", registry,
                 wrk_put(url, f"/v2/{PUSHED}/manifests/r{round_number}", body, content_type, seconds))
    targets = {"manifest GET by tag": 4, "tag list": 4, "blob HEAD": 4, "manifest PUT (new tag each)": 2}
    rows = [compare(metric, by_registry, targets[metric]) for metric, by_registry in runs.items()]
    kura_put, reference_put = best(runs["manifest PUT (new tag each)"]["kura"]), \
        best(runs["manifest PUT (new tag each)"]["distribution"])
    rows.append(Row(SECTION, "manifest PUT p99 latency", "ms", kura_put.p99_ms, reference_put.p99_ms, target=1.0,
                    detail="lower is better; target: below the reference's"))
    rows += _growth(context, registries, manifest, content_type, layer)
    rss = {registry.name: registry.peak_rss() for registry in registries}
    return rows, rss


def _growth(context: Context, registries: list[Running], manifest: bytes, content_type: str, layer: str) -> list[Row]:
    rows = []
    seconds = max(1.0, context.seconds / 2)
    tag_counts = (100, 1000) if context.quick else (100, 1000, 10000)
    repository_counts = (100, 1000) if context.quick else (100, 10000)
    for count in tag_counts:
        name = f"growth/tags{count}"
        document = json.loads(manifest)
        for registry in registries:
            for descriptor in [document["config"], *document["layers"]]:
                asyncio.run(mount_into(registry.url, descriptor["digest"], "library/redis", [name]))
            asyncio.run(put_tags(registry.url, name, manifest, content_type, [f"v{n}" for n in range(count)]))
        runs = alternate(registries, context.rounds,
                         lambda registry: wrk(f"{registry.url}/v2/{name}/tags/list", seconds, connections=8))
        rows.append(compare(f"tag list, {count:,} tags (c=8)", runs, None))
    made = 0
    for count in repository_counts:
        names = [f"growth/repo{n:05d}" for n in range(made, count)]
        for registry in registries:
            asyncio.run(mount_into(registry.url, layer, "library/redis", names))
        made = count
        runs = alternate(registries, context.rounds,
                         lambda registry: wrk(f"{registry.url}/v2/_catalog?n=100", seconds, connections=8))
        rows.append(compare(f"catalog first page (n=100), {count:,} repositories (c=8)", runs, None))
    return rows
