"""64 MiB blobs: upload monolithic (POST, then one PUT with the body) and chunked (PATCHes of
16 MiB, then PUT), one at a time; download with one and with eight clients at once. The bytes
travel through curl (a client that is not the bottleneck), timed by curl itself where one runs
at a time (its start-up and its reading of the file to send are the client's, not the
server's); Kura and the reference alternated."""

from __future__ import annotations

import hashlib
import random
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .context import Context, median
from .results import Row
from .servers import MIB, Running, start_kura, start_reference

SECTION = "blobs, 64 MiB"
SIZE = 64 * MIB
CHUNK = 16 * MIB
DOWNLOADS_EACH = 4


def make_blob(path: Path, seed: int) -> str:
    data = random.Random(seed).randbytes(SIZE)
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _location(registry: Running, location: str) -> str:
    return registry.url + location if location.startswith("/") else location


def _start_upload(registry: Running, name: str) -> str:
    request = urllib.request.Request(f"{registry.url}/v2/{name}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(request) as response:
        assert response.status == 202, response.status
        return _location(registry, response.headers["Location"])


def _curl(*args: str) -> dict[str, str]:
    """One request; its answer's headers, `status`, and `seconds`: curl's own time for the
    transfer (not its start-up, nor the reading of a --data-binary file into memory first)."""
    ran = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", "-w", "\n%{http_code} %{time_total}",
                          *args], capture_output=True, text=True, check=True, timeout=300)
    headers = {}
    lines = ran.stdout.strip().splitlines()
    for line in lines[:-1]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    headers["status"], headers["seconds"] = lines[-1].split()
    return headers


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def upload_monolithic(registry: Running, name: str, blob: Path, digest: str) -> float:
    started = time.perf_counter()
    location = _start_upload(registry, name)
    opened = time.perf_counter() - started
    answer = _curl("-X", "PUT", "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{blob}",
                   _with_digest(location, digest))
    assert answer["status"] == "201", answer
    return opened + float(answer["seconds"])


def upload_chunked(registry: Running, name: str, blob: Path, digest: str, parts: Path) -> float:
    pieces = []
    with open(blob, "rb") as f:
        for number in range(SIZE // CHUNK):
            piece = parts / f"{blob.name}.{number}"
            piece.write_bytes(f.read(CHUNK))
            pieces.append(piece)
    started = time.perf_counter()
    location = _start_upload(registry, name)
    seconds = time.perf_counter() - started
    for number, piece in enumerate(pieces):
        first = number * CHUNK
        answer = _curl("-X", "PATCH", "-H", "Content-Type: application/octet-stream",
                       "-H", f"Content-Range: {first}-{first + CHUNK - 1}", "--data-binary", f"@{piece}", location)
        assert answer["status"] == "202", answer
        seconds += float(answer["seconds"])
        location = _location(registry, answer["location"])
    answer = _curl("-X", "PUT", _with_digest(location, digest))
    assert answer["status"] == "201", answer
    seconds += float(answer["seconds"])
    for piece in pieces:
        piece.unlink()
    return seconds


def download(registry: Running, name: str, digest: str, clients: int) -> float:
    """MiB/s over `clients` curl processes, each fetching the blob DOWNLOADS_EACH times: by
    curl's own transfer times with one client, by the wall clock with several at once."""
    url = f"{registry.url}/v2/{name}/blobs/{digest}"

    def one_client() -> float:
        seconds = 0.0
        for _ in range(DOWNLOADS_EACH):
            answer = _curl("-L", url)
            assert answer["status"] == "200", answer
            seconds += float(answer["seconds"])
        return seconds

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        transfer = list(pool.map(lambda _: one_client(), range(clients)))
    seconds = transfer[0] if clients == 1 else time.perf_counter() - started
    return clients * DOWNLOADS_EACH * SIZE / MIB / seconds


def run(context: Context) -> tuple[list[Row], dict[str, int]]:
    work = context.scratch("blobs")
    registries = [start_kura(work / "kura", workers=context.workers), start_reference(work / "reference")]
    samples: dict[str, dict[str, list[float]]] = {}

    def note(metric: str, registry: Running, value: float) -> None:
        samples.setdefault(metric, {}).setdefault(registry.name, []).append(value)

    try:
        for round_number in range(context.rounds):
            mono, chunked = work / f"mono{round_number}", work / f"chunked{round_number}"
            mono_digest, chunked_digest = make_blob(mono, 2 * round_number), make_blob(chunked, 2 * round_number + 1)
            for registry in registries:
                note("upload, monolithic (c=1)", registry, SIZE / MIB / upload_monolithic(registry, "blobs/up", mono, mono_digest))
                note("upload, chunked 4 × 16 MiB (c=1)", registry,
                     SIZE / MIB / upload_chunked(registry, "blobs/up", chunked, chunked_digest, work))
            for registry in registries:
                note("download (c=1)", registry, download(registry, "blobs/up", mono_digest, 1))
                note("download (c=8)", registry, download(registry, "blobs/up", mono_digest, 8))
            mono.unlink()
            chunked.unlink()
        rss = {registry.name: registry.peak_rss() for registry in registries}
    finally:
        for registry in registries:
            registry.stop()
    targets = {"upload, monolithic (c=1)": 2, "upload, chunked 4 × 16 MiB (c=1)": 2, "download (c=1)": 1.3,
               "download (c=8)": 1.3}
    rows = []
    for metric, by_registry in samples.items():
        kura, reference = median(by_registry["kura"]), median(by_registry["distribution"])
        rows.append(Row(SECTION, metric, "MiB/s", kura, reference, target=targets[metric],
                        detail=f"rounds: Kura {', '.join(f'{v:.0f}' for v in by_registry['kura'])}; "
                               f"ref {', '.join(f'{v:.0f}' for v in by_registry['distribution'])}",
                        samples=by_registry))
    return rows, rss
