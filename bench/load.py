"""Load generators that are not the bottleneck: wrk (Debian's package) for GET and PUT,
ApacheBench (apache2-utils) for HEAD, which wrk cannot drive (it waits for the body a HEAD
answer announces but never sends)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_REPORT = r'''
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
                 + summary.errors.status + summary.errors.timeout
  io.write(string.format("KURA_BENCH {\"requests\": %d, \"seconds\": %f, \"errors\": %d, \"p50_ms\": %f, \"p99_ms\": %f}\n",
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
'''

_PUT_SCRIPT = r'''
local body = io.open(os.getenv("KURA_BENCH_BODY")):read("*a")
local content_type = os.getenv("KURA_BENCH_TYPE")
local prefix = os.getenv("KURA_BENCH_PATH")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("PUT", prefix .. "t" .. tid .. "-" .. counter, {["Content-Type"] = content_type}, body)
end
'''


@dataclass
class Load:
    rate: float    # requests per second
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int

    @property
    def detail(self) -> str:
        errors = f", {self.errors} errors" if self.errors else ""
        return f"p50 {self.p50_ms:.1f} / p99 {self.p99_ms:.1f} ms{errors}"


def wrk(url: str, seconds: float, connections: int = 32, threads: int = 2, headers: dict | None = None,
        script: str = "", env: dict | None = None) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script + _REPORT)
        lua.flush()
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", lua.name]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        ran = subprocess.run(command + [url], capture_output=True, text=True, timeout=seconds + 60,
                             env=env, check=True)
    line = next(line for line in ran.stdout.splitlines() if line.startswith("KURA_BENCH "))
    report = json.loads(line.split(" ", 1)[1])
    # Non-2xx answers are counted by wrk as status errors: a benchmark of failures is worthless.
    return Load(report["requests"] / report["seconds"], report["p50_ms"], report["p99_ms"],
                report["errors"], report["requests"])


def wrk_put(base_url: str, path_prefix: str, body: Path, content_type: str, seconds: float,
            connections: int = 32) -> Load:
    """PUTs of one body to a new path each (`path_prefix` + a per-thread counter)."""
    import os
    env = dict(os.environ, KURA_BENCH_BODY=str(body), KURA_BENCH_TYPE=content_type, KURA_BENCH_PATH=path_prefix)
    return wrk(base_url, seconds, connections, script=_PUT_SCRIPT, env=env)


def ab_head(url: str, seconds: float, connections: int = 32) -> Load:
    ran = subprocess.run(["ab", "-q", "-k", "-i", "-c", str(connections), "-t", str(seconds), "-n", "10000000",
                          "-e", "/dev/stdout", url], capture_output=True, text=True, timeout=seconds + 60, check=True)
    out = ran.stdout

    def field(pattern: str) -> float:
        found = re.search(pattern, out, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    # ab's -e table: "percentage,time in ms" for 0..100.
    percentiles = dict(re.findall(r"^(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)$", out, re.MULTILINE))
    errors = int(field(r"^Failed requests:\s+(\d+)")) + int(field(r"^Non-2xx responses:\s+(\d+)"))
    return Load(field(r"^Requests per second:\s+([\d.]+)"), float(percentiles.get("50", 0)),
                float(percentiles.get("99", 0)), errors, int(field(r"^Complete requests:\s+(\d+)")))
