"""The pull-through cache: Kura (`[[proxy]] prefix = "docker.io"`) against the reference
registry in proxy mode (`proxy: remoteurl:`), both in front of the emulated Docker Hub
(tests/support/fake_hub.py: token auth, rate-limit headers, Kura's store underneath), run in a
thread of this process. skopeo pulls library/redis:7 (linux/amd64 only, as a client on this
machine asks for) through each: cold (fresh cache storage, a fresh server each round) then
warm (the same pull again); Kura and the reference alternated. A pull directly from the hub
each round, for scale (in the notes). Names: the reference serves the hub at its root
(`library/redis`), Kura under its prefix (`docker.io/library/redis`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from pathlib import Path
from typing import Iterator

from tests.support.fake_hub import EmulatedHub, emulated_hub
from tests.support.servers import free_port, run_distribution, wait_until_up

from .clients import skopeo_copy, timed
from .context import Context, median
from .results import Row
from .servers import Running, start_kura, terminate

SECTION = "pull-through cache"
IMAGE = "library/redis:7"


@contextlib.contextmanager
def hub_in_a_thread(workdir: Path) -> Iterator[EmulatedHub]:
    """The emulated hub served from an event loop of its own, in a daemon thread, until the
    block ends. Its pull limit is lifted: the benchmark pulls more than a hub's 100."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    held: dict = {}

    async def serve() -> None:
        held["done"] = asyncio.Event()
        try:
            async with emulated_hub(workdir / "hub", seed_cache=workdir / "hub-seed") as hub:
                hub.set_rate_limit(1_000_000)
                held["hub"] = hub
                ready.set()
                await held["done"].wait()
        finally:
            ready.set()

    def thread_main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # reported to the caller
            held["error"] = exc
            ready.set()

    thread = threading.Thread(target=thread_main, name="emulated-hub", daemon=True)
    thread.start()
    ready.wait(300)
    if "hub" not in held:
        raise RuntimeError(f"the emulated hub did not start: {held.get('error')!r}")
    try:
        yield held["hub"]
    finally:
        loop.call_soon_threadsafe(held["done"].set)
        thread.join(30)
        loop.close()


def start_kura_cache(context: Context, workdir: Path, hub_url: str) -> Running:
    return start_kura(workdir, workers=context.workers,
                      extra_config=f'\n[[proxy]]\nprefix = "docker.io"\nremote = "{hub_url}"\n')


def reference_proxy_config(storage: Path, port: int, hub_url: str) -> str:
    """distribution 2.8 as a pull-through cache: shared/tools/peer-registry.sh writes a fixed
    config (no proxy section), so this one is written here, otherwise the same (filesystem,
    in-memory blob descriptor cache, access log off)."""
    return f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
proxy:
  remoteurl: {hub_url}
"""


def start_reference_cache(workdir: Path, hub_url: str) -> Running:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = run_distribution(workdir, reference_proxy_config(workdir / "storage", port, hub_url))
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v2/", process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Running("distribution", f"127.0.0.1:{port}", lambda: [process.pid], lambda: terminate(process))


def run(context: Context) -> tuple[list[Row], dict[str, int]]:
    work = context.scratch("proxy")
    samples: dict[str, dict[str, list[float]]] = {}
    rss: dict[str, int] = {}

    def note(metric: str, who: str, seconds: float) -> None:
        samples.setdefault(metric, {}).setdefault(who, []).append(1000 * seconds)

    with hub_in_a_thread(work) as hub:
        starters = {"kura": lambda root: start_kura_cache(context, root, hub.registry_url),
                    "distribution": lambda root: start_reference_cache(root, hub.registry_url)}
        names = {"kura": f"docker.io/{IMAGE}", "distribution": IMAGE}
        pulled = work / "pulled"
        for round_number in range(context.rounds):
            note("direct", "hub", timed(skopeo_copy(f"docker://{hub.registry_host}/{IMAGE}", f"oci:{pulled}:7"),
                                        [pulled]))
            for who, start in starters.items():  # A B A B
                root = work / f"{who}-{round_number}"
                cache = start(root)
                try:
                    source = f"docker://{cache.host}/{names[who]}"
                    note("cold", who, timed(skopeo_copy(source, f"oci:{pulled}:7"), [pulled]))
                    note("warm", who, timed(skopeo_copy(source, f"oci:{pulled}:7"), [pulled]))
                    rss[who] = max(rss.get(who, 0), cache.peak_rss())
                finally:
                    cache.stop()
                    shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pulled, ignore_errors=True)
    direct = samples.pop("direct")["hub"]
    rows = []
    for phase, metric in (("cold", "skopeo pull of redis, cold cache (fresh storage)"),
                          ("warm", "skopeo pull of redis, warm cache (the same pull again)")):
        kura, reference = samples[phase]["kura"], samples[phase]["distribution"]
        rows.append(Row(SECTION, metric, "ms", median(kura), median(reference), reference_name="distribution proxy",
                        detail=f"rounds: Kura {_listed(kura)}; ref {_listed(reference)}; "
                               f"directly from the hub {median(direct):.0f} ms",
                        samples={"kura": kura, "distribution": reference, "hub direct": direct}))
    return rows, rss


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in values)
