"""`make bench` / `make bench-quick`: run every section, print one table, keep the results.

Sections: small requests (wrk/ab), 64 MiB blobs, the client against skopeo/umoci, the
pull-through cache, S3 (KURA_BENCH_S3=0 leaves it out). Each compares Kura with the reference
measured in the same run, alternated; nothing here asserts a speed."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.support.paths import require_shared

from . import blobs, clients, small_requests
from .context import Context
from .results import Row, table, write_chart, write_json
from .servers import MIB

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = {"small": small_requests, "blobs": blobs, "clients": clients}


def optional_sections() -> dict:
    found = {}
    for name, module in (("proxy", "bench.proxy"), ("s3", "bench.s3")):
        try:
            found[name] = __import__(module, fromlist=["run"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return found


def use_bytecode() -> str:
    """Compile Kura's modules once and let every process use the bytecode, as an installed
    Python package does (pip compiles at install time). A machine with PYTHONDONTWRITEBYTECODE
    set (as these test machines are) would otherwise compile the client from source at every
    command: 0.1-0.6 s of a `kura pull`'s start-up that no installed copy pays."""
    import compileall
    root = Path(__file__).resolve().parent.parent
    for package in ("kura", "puller", "registry", "storage", "ocispec"):
        compileall.compile_dir(root / package, quiet=1)
    was = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return "bytecode compiled up front" + (" (PYTHONDONTWRITEBYTECODE was set: unset for the run)" if was else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a pass of about a minute: one round, short runs")
    parser.add_argument("--only", action="append", default=None, help="run only these sections (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="kura serve --workers (default: its default)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    require_shared()
    bytecode_note = use_bytecode()
    sections = dict(SECTIONS, **optional_sections())
    if args.quick:
        sections = {name: module for name, module in sections.items() if name in ("small", "blobs", "clients")}
    if os.environ.get("KURA_BENCH_S3") == "0":
        sections.pop("s3", None)
    if args.only:
        sections = {name: module for name, module in sections.items() if name in args.only}
    workdir = Path(tempfile.mkdtemp(prefix="kura-bench-"))
    context = Context(workdir, args.quick, rounds=1 if args.quick else 3, seconds=2.0 if args.quick else 5.0,
                      workers=args.workers)
    rows: list[Row] = []
    rss: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    try:
        for name, module in sections.items():
            print(f"[bench] {name} …", file=sys.stderr, flush=True)
            section_started = time.monotonic()
            section_rows, section_rss = module.run(context)
            rows += section_rows
            rss[name] = section_rss
            print(f"[bench] {name}: {time.monotonic() - section_started:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for name, peaks in rss.items():
        if "kura" in peaks and "distribution" in peaks:
            rows.append(Row("memory", f"peak RSS per server process, {name}", "MiB", peaks["kura"] / MIB,
                            peaks["distribution"] / MIB, target=1.0, detail="lower is better; Kura: its largest worker"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    title = (f"Kura vs distribution / skopeo, {'quick' if args.quick else 'full'} run {stamp}, "
             f"{os.cpu_count()} cores, {time.monotonic() - started:.0f} s")
    print(f"\n{title}; {bytecode_note}\n")
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"{stamp}.json"
    write_json(rows, json_path, {"title": title, "quick": args.quick, "rounds": context.rounds,
                                 "seconds": context.seconds, "workers": args.workers, "python": sys.version,
                                 "machine": platform.platform(), "load_average": os.getloadavg(),
                                 "bytecode": bytecode_note})
    chart = RESULTS / f"{stamp}.png"
    drawn = write_chart(rows, chart, title)
    print(f"\nresults: {json_path}" + (f", chart: {chart}" if drawn else f" (no chart: {drawn.reason})"))
    missed = [row for row in rows if row.met == "MISSED"]
    print(f"targets: {sum(1 for row in rows if row.met == 'met')} met, {len(missed)} missed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
