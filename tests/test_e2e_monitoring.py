"""/metrics of `kura serve --workers 2`: whichever worker answers a scrape, the counts are the
sum over both workers, dead ones included; what only a live worker holds (uploads in
progress) leaves with it; the shared directory is gone once the server stops."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import signal
import socket
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import Server
from tests.test_serve_workers import get, start, stop, wait_for, workers

CATALOG = ("kura_http_requests_total", (("method", "GET"), ("route", "/v2/_catalog"), ("status", "200")))


def scrape(server: Server) -> dict[tuple, float]:
    """One scrape on a connection of its own (any worker may answer it)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def catalog_pids(log: Path) -> set[int]:
    return {int(pid) for pid in re.findall(r" worker \d+ \(pid (\d+)\) INFO aiohttp\.access: .*GET /v2/_catalog ",
                                           log.read_text())}


def shared_directories() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "kura-metrics-*")))


def test_the_counts_of_two_workers_add_up(tmp_path):
    before = shared_directories()
    server, log = start(tmp_path, count=2)
    try:
        made = shared_directories() - before
        assert len(made) == 1
        pids = workers(server)
        for _ in range(40):  # each on a connection of its own, spread over the workers by the kernel
            assert get(server, "/v2/_catalog") == 200
        wait_for(lambda: catalog_pids(log) == pids, f"both workers {pids} answering the catalog")
        # Each worker adds its counts to the shared files within a second (FLUSH_SECONDS).
        wait_for(lambda: scrape(server).get(CATALOG) == 40, "the 40 requests counted")
        for _ in range(6):
            assert scrape(server)[CATALOG] == 40

        # An upload request held in progress, then every worker killed: the counts stay, the
        # gauge of requests in progress does not count the dead.
        host, port = server.host.split(":")
        held = socket.create_connection((host, int(port)), timeout=30)
        digest = "sha256:" + hashlib.sha256(b"x" * 100).hexdigest()  # a monolithic upload: the body is read
        held.sendall(f"POST /v2/team/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 100\r\n\r\nxxxx".encode())
        wait_for(lambda: scrape(server).get(("kura_uploads_in_progress", ())) == 1, "the upload in progress")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(workers(server)) == 2 and not workers(server) & pids, "two new workers")
        held.close()
        samples = scrape(server)
        assert samples[CATALOG] == 40
        assert samples[("kura_uploads_in_progress", ())] == 0
    finally:
        stop(server)
    assert not any(Path(path).exists() for path in made)
