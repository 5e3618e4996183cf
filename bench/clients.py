"""The client against skopeo (and umoci for unpacking), all from/to one Kura server, run one
after the other, fresh directories each time: `kura pull` (store only), `kura push` (to a fresh
registry each time), `kura pull --unpack`, `kura pull --help` start-up; and pulls (skopeo)
of images with 1, 10 and 50 layers from Kura against the same from the reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support.paths import IMAGES

from .context import Context, median
from .results import Row
from .seeding import layered_image, push_shared_image
from .servers import start_kura, start_reference

SECTION = "client"
KURA = str(Path(sys.executable).parent / "kura")
HELP_BUDGET_MS = 60.0


def timed(command: list[str], prepare: list[Path] = (), env: dict | None = None) -> float:
    for path in prepare:
        shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, env=env)
    return time.perf_counter() - started


def skopeo_copy(source: str, destination: str) -> list[str]:
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", source, destination]


def run(context: Context) -> tuple[list[Row], dict[str, int]]:
    work = context.scratch("clients")
    kura_server = start_kura(work / "server", workers=context.workers)
    reference_server = start_reference(work / "reference")
    try:
        push_shared_image(kura_server.host)
        rows = _clients(context, work, kura_server.host)
        rows += _layer_series(context, work, kura_server, reference_server)
        rss = {"kura": kura_server.peak_rss(), "distribution": reference_server.peak_rss()}
    finally:
        kura_server.stop()
        reference_server.stop()
    return rows, rss


def _clients(context: Context, work: Path, host: str) -> list[Row]:
    image = f"{host}/library/redis:7"
    store, layout, bundle = work / "store", work / "layout", work / "bundle"
    env = dict(os.environ, XDG_DATA_HOME=str(work / "xdg"), XDG_CONFIG_HOME=str(work / "xdg-config"))
    runs = max(3, context.rounds * 2)
    samples: dict[str, dict[str, list[float]]] = {}

    def note(metric: str, who: str, seconds: float) -> None:
        samples.setdefault(metric, {}).setdefault(who, []).append(seconds * 1000)

    subprocess.run([KURA, "pull", "-q", "--store", str(work / "push-source"), image], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=300)
    for number in range(runs):
        note("pull of redis, store only", "kura",
             timed([KURA, "pull", "-q", "--store", str(store), image], [store], env))
        note("pull of redis, store only", "skopeo", timed(skopeo_copy(f"docker://{image}", f"oci:{layout}:7"), [layout]))
        # Each push to a registry of its own: into a store that holds the layers already (or
        # one skopeo's blob cache knows of), a push is a mount.
        for who, command in (("kura", lambda to: [KURA, "push", "-q", f"oci:{IMAGES / 'redis'}:7", f"{to}/push/redis:7"]),
                             ("skopeo", lambda to: skopeo_copy(f"oci:{IMAGES / 'redis'}:7", f"docker://{to}/push/redis:7"))):
            fresh = start_kura(work / f"push-{who}-{number}", workers=context.workers)
            try:
                note("push of redis to a fresh registry", who, timed(command(fresh.host), env=env))
            finally:
                fresh.stop()
                shutil.rmtree(work / f"push-{who}-{number}", ignore_errors=True)
        if number < max(2, context.rounds):
            note("pull --unpack of redis", "kura",
                 timed([KURA, "pull", "-q", "--store", str(store), "--unpack", str(bundle), image], [store, bundle], env))
            started = time.perf_counter()
            timed(skopeo_copy(f"docker://{image}", f"oci:{layout}:7"), [layout, bundle])
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:7", str(bundle)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
            note("pull --unpack of redis", "skopeo + umoci", time.perf_counter() - started)
        note("`kura pull --help` start-up", "kura", timed([KURA, "pull", "--help"], env=env))
    shutil.rmtree(bundle, ignore_errors=True)
    targets = {"pull of redis, store only": 1 / 0.8, "push of redis to a fresh registry": 1 / 0.7,
               "pull --unpack of redis": 1 / 0.25}
    rows = []
    for metric, by_client in samples.items():
        kura = by_client["kura"]
        if metric.startswith("`kura pull --help`"):
            rows.append(Row(SECTION, metric, "ms", median(kura), HELP_BUDGET_MS, reference_name="budget",
                            target=1.0, detail=f"min {min(kura):.0f} ms", samples=by_client))
            continue
        other_name = next(name for name in by_client if name != "kura")
        other = by_client[other_name]
        rows.append(Row(SECTION, metric, "ms", median(kura), median(other), reference_name=other_name,
                        target=targets[metric], detail=f"min Kura {min(kura):.0f} / {other_name} {min(other):.0f} ms",
                        samples=by_client))
    return rows


def _layer_series(context: Context, work: Path, kura_server, reference_server) -> list[Row]:
    rows = []
    for layers in (1, 10, 50):
        source = work / f"layers{layers}"
        tag = layered_image(source, layers)
        samples: dict[str, list[float]] = {}
        for registry in (kura_server, reference_server):
            subprocess.run(skopeo_copy(f"oci:{source}:{tag}", f"docker://{registry.host}/growth/layers:{tag}"),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        for _ in range(max(2, context.rounds)):
            for registry in (kura_server, reference_server):
                target = work / f"pulled-{registry.name}"
                samples.setdefault(registry.name, []).append(1000 * timed(
                    skopeo_copy(f"docker://{registry.host}/growth/layers:{tag}", f"oci:{target}:{tag}"), [target]))
        rows.append(Row(SECTION, f"skopeo pull of an image with {layers} layer{'s' if layers > 1 else ''} (64 KiB each)",
                        "ms", median(samples["kura"]), median(samples["distribution"]),
                        detail="the server compared: the same skopeo pulls from each", samples=samples))
    return rows
