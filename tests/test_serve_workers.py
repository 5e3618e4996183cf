"""`kura serve --workers N`: worker processes on one port under a supervisor that replaces a
worker that dies, reloads on SIGHUP without refusing a connection or cutting a download
short, keeps serving when the new config is wrong, and stops on SIGTERM."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.paths import REPO
from tests.support.servers import Server, free_port, start_kura, stop

DEADLINE = 60.0


def wait_for(condition, what: str, timeout: float = DEADLINE):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)


def workers(server: Server) -> set[int]:
    pid = server.process.pid
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def get(server: Server, path: str = "/v2/") -> int:
    """One request on a connection of its own."""
    with urllib.request.urlopen(f"{server.url}{path}", timeout=30) as response:
        response.read()
        return response.status


def access_pids(log: Path) -> set[int]:
    """The worker pids named on the access log lines so far."""
    return {int(pid) for pid in re.findall(r" worker \d+ \(pid (\d+)\) INFO aiohttp\.access: ", log.read_text())}


def start(tmp_path: Path, *args: str, count: int = 2) -> tuple[Server, Path]:
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, *args, log=log, workers=count)
    wait_for(lambda: len(workers(server)) == count, f"{count} workers")
    return server, log


def test_two_workers_share_the_port(tmp_path):
    server, log = start(tmp_path)
    try:
        pids = workers(server)
        answered = 0
        for _ in range(400):  # each on a connection of its own, spread by the kernel
            assert get(server) == 200
            answered += 1
            if access_pids(log) == pids:
                break
        wait_for(lambda: access_pids(log) == pids, f"both workers {pids} in the access log after "
                 f"{answered} requests: {access_pids(log)}")
        assert workers(server) == pids
    finally:
        stop(server)
    assert server.process.returncode == 0


def test_a_worker_that_dies_is_replaced(tmp_path):
    server, log = start(tmp_path)
    try:
        before = workers(server)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(workers(server)),
                         "a new worker in place of the killed one")
        assert before - {victim} < after
        wait_for(lambda: re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL after [0-9.]+ s; "
                                   r"starting another", log.read_text()), "the death logged")
        for _ in range(20):
            assert get(server) == 200
    finally:
        stop(server)


def push_blob(server: Server, name: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    request = urllib.request.Request(f"{server.url}/v2/{name}/blobs/uploads/?digest={digest}", data=data,
                                     method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 201
    return digest


class Prober(threading.Thread):
    """New connections, one request each, over and over until stopped: what failed, and when."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        self.done = threading.Event()
        self.answered: list[float] = []
        self.failed: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = get(self.server)
            except OSError as exc:
                self.failed.append(repr(exc))
                continue
            if status == 200:
                self.answered.append(time.monotonic())
            else:
                self.failed.append(f"HTTP {status}")

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.answered if start <= t <= end)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)


def test_sighup_restarts_the_workers_without_dropping_a_download_or_a_connection(tmp_path):
    server, log = start(tmp_path)
    prober = None
    try:
        data = os.urandom(64 << 20)  # far more than the socket buffers hold: the handler is still sending
        digest = push_blob(server, "big", data)
        old = workers(server)
        download = http.client.HTTPConnection("127.0.0.1", int(server.host.rsplit(":", 1)[1]), timeout=120)
        download.request("GET", f"/v2/big/blobs/{digest}")
        response = download.getresponse()
        assert response.status == 200 and int(response.headers["Content-Length"]) == len(data)
        received = hashlib.sha256()
        first = response.read(1 << 20)
        received.update(first)
        size = len(first)

        prober = Prober(server)
        prober.start()
        wait_for(lambda: prober.answered, "the prober's first answer")
        sighup = time.monotonic()
        os.kill(server.process.pid, signal.SIGHUP)
        # The new workers start beside the old ones; the old one that is not busy goes at once,
        # the other waits for the download, which stands still until the new ones are serving.
        new = wait_for(lambda: (lambda now: now - old if len(now - old) == 2 else None)(workers(server)),
                       "two new workers")
        wait_for(lambda: len(workers(server) & old) == 1, "the idle old worker gone")
        busy = workers(server) & old
        wait_for(lambda: prober.between(sighup, time.monotonic()) >= 20 and
                 access_pids(log) & new, "answers from the new workers")
        assert workers(server) & old == busy, "the worker sending the download left before it was done"

        while chunk := response.read(256 << 10):  # the rest, slowly: the socket buffers stay full
            received.update(chunk)
            size += len(chunk)
            time.sleep(0.01)
        download.close()
        assert size == len(data) and "sha256:" + received.hexdigest() == digest
        wait_for(lambda: workers(server) == new, "only the new workers left")
        wait_for(lambda: "reload complete" in log.read_text(), "the reload's end logged")
        prober.stop()
        assert not prober.failed, prober.failed[:5]
        assert get(server, f"/v2/big/blobs/{digest}") == 200
    finally:
        if prober is not None:
            prober.stop()
        stop(server)
    assert server.process.returncode == 0


def test_sighup_with_a_broken_config_keeps_the_workers(tmp_path):
    config = tmp_path / "kura.toml"
    config.write_text("[server]\nworkers = 2\n")
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, "--config", str(config), log=log, workers=None)
    try:
        pids = wait_for(lambda: (lambda now: now if len(now) == 2 else None)(workers(server)), "2 workers")
        config.write_text("[server]\nworkers = 2\nmax_connections = -5\n")
        os.kill(server.process.pid, signal.SIGHUP)
        line = wait_for(lambda: [l for l in log.read_text().splitlines() if "SIGHUP" in l], "the refusal logged")
        assert len(line) == 1 and line[0].endswith(
            " ERROR kura.server: SIGHUP: not reloaded, still serving with the previous configuration: "
            "max_connections must be positive"), line
        for _ in range(20):
            assert get(server) == 200
        assert workers(server) == pids

        config.write_text("[server]\nworkers = 3\n")  # fixed: the next SIGHUP reloads, with one more
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: (lambda now: len(now) == 3 and not now & pids)(workers(server)), "3 new workers")
        assert get(server) == 200
    finally:
        stop(server)
    assert server.process.returncode == 0


def test_sigterm_stops_every_worker_and_exits_0(tmp_path):
    server, log = start(tmp_path, count=3)
    pids = workers(server)
    assert get(server) == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=DEADLINE) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or f"{pid}" not in Path(f"/proc/{pid}/stat").read_text()[:20]
    assert "SIGTERM: stopping 3 worker(s)" in log.read_text()
    assert "Traceback" not in log.read_text()


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_port_in_use_is_one_line_and_a_failure(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "data"), "--workers", "2")
    assert result.returncode == 1
    assert result.stderr == f"kura: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_a_second_server_with_workers_does_not_share_the_port(tmp_path):
    # SO_REUSEPORT would let it join the first one's sockets; it must be refused instead.
    server, _ = start(tmp_path)
    try:
        port = server.host.rsplit(":", 1)[1]
        result = serve("--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "other"), "--workers", "2")
        assert result.returncode == 1
        assert result.stderr == f"kura: cannot listen on 127.0.0.1:{port}: address already in use\n"
        assert get(server) == 200
    finally:
        stop(server)


def test_workers_that_cannot_start_make_it_give_up(tmp_path):
    # The supervisor's checks pass; the first worker's start-up recount of the quota finds a
    # file where the usage ledgers' directory should be, and dies.
    root = tmp_path / "data"
    root.mkdir()
    (root / "usage").write_text("not a directory\n")
    config = tmp_path / "kura.toml"
    config.write_text('[[quota]]\nrepositories = ["team/*"]\nmax_bytes = 1000000\n')
    result = serve("--listen", f"127.0.0.1:{free_port()}", "--root", str(root), "--config", str(config),
                   "--workers", "2")
    assert result.returncode == 1
    assert "serving registry" not in result.stderr
    assert re.search(r" ERROR kura.server: worker \d exited with status 1 before it was ready, 5 times in a row: "
                     r"giving up, stopping the other workers", result.stderr), result.stderr
    assert "NotADirectoryError" in result.stderr  # the cause, in the worker's own words


def test_one_worker_recounts_the_quotas(tmp_path):
    config = tmp_path / "kura.toml"
    config.write_text('[[quota]]\nrepositories = ["team/*"]\nmax_bytes = 1000000\n')
    server, log = start(tmp_path, "--config", str(config), count=3)
    try:
        assert get(server) == 200
    finally:
        stop(server)
    counts = re.findall(r" worker (\d) \(pid \d+\) INFO kura.registry: quota on team/\*: 0 of 1000000 bytes used",
                        log.read_text())
    assert counts == ["1"], log.read_text()


def test_failed_logins_count_across_the_workers(tmp_path):
    from registry.auth import htpasswd

    root = tmp_path / "data"
    htpasswd.set_user(root / "auth" / "htpasswd", "alice", "the right password", cost=4)
    config = tmp_path / "kura.toml"
    config.write_text('[auth]\nmode = "htpasswd"\nlogin_attempts = 3\nlogin_window_seconds = 600\n')
    tables = set(Path(tempfile.gettempdir()).glob("kura-logins-*"))
    server, log = start(tmp_path, "--config", str(config))
    try:
        assert len(set(Path(tempfile.gettempdir()).glob("kura-logins-*")) - tables) == 1
        guess = urllib.request.Request(f"{server.url}/v2/", headers={"Authorization": "Basic YWxpY2U6Z3Vlc3M="})
        statuses = []
        while len(statuses) < 12 or (len(access_pids(log)) < 2 and len(statuses) < 400):
            try:
                urllib.request.urlopen(guess, timeout=30)
                statuses.append(200)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
        assert len(access_pids(log)) == 2, "every guess went to one worker: this proved nothing"
        # Three wrong passwords in all, whichever worker saw them; then every worker says 429.
        assert statuses[:3] == [401] * 3 and set(statuses[3:]) == {429}, statuses
    finally:
        stop(server)
    assert set(Path(tempfile.gettempdir()).glob("kura-logins-*")) <= tables  # the supervisor removed it


async def test_the_shared_login_table_counts_for_every_worker():
    import asyncio

    from registry.auth.ratelimit import Client
    from registry.auth.shared_limits import LoginTable, SharedLoginLimiter

    table = LoginTable()
    try:
        one, two = (SharedLoginLimiter(3, 600, table) for _ in range(2))  # as in two workers
        client = Client("192.0.2.7")
        for limiter in (one, one, two):
            assert await limiter.begin(client, "alice") == 0
        for limiter in (one, one, two):
            limiter.end(client, "alice", False)
        assert await one.begin(client, "alice") > 0 and await two.begin(client, "alice") > 0
        assert await two.begin(client, "bob") == 0  # another name from that address still may try
        two.end(client, "bob", True)

        other = Client("192.0.2.8")
        for limiter in (one, two, one):  # three checks in progress hold all the tries...
            assert await limiter.begin(other, "carol") == 0
        table.forget(os.getpid())  # ...until the worker running them is gone
        assert await asyncio.wait_for(two.begin(other, "carol"), 30) == 0
    finally:
        table.remove()
    assert not table.path.exists()
