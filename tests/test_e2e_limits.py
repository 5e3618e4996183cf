"""`kura serve` under clients that try to exhaust it: stalled bodies, slow headers, idle
connections, more connections than it has descriptors. Real processes, raw sockets."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import resource
import time
from pathlib import Path

import pytest

from registry.auth import htpasswd
from tests.support.servers import Server, start_kura, stop

MIB = 1 << 20
STALLS = 500
BODY_TIMEOUT = 6
RSS_LIMIT = 200 * MIB
USER, PASSWORD = "alice", "alice-password"


def raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


def serve(tmp_path: Path, mode: str = "none", **sections: dict) -> Server:
    """`kura serve` with a config made of `sections` ({"server": {...}, ...}) in auth `mode`."""
    root = tmp_path / "data"
    if mode != "none":
        htpasswd.set_user(root / "auth" / "htpasswd", USER, PASSWORD, cost=4)
    sections.setdefault("auth", {})["mode"] = mode
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
                   for name, table in sections.items())
    config = tmp_path / "kura.toml"
    config.write_text(text)
    return start_kura(root, None, "--config", str(config), log=tmp_path / "kura.log")


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "kura.log").read_text(errors="replace")


async def http(host: str, port: int, request: bytes, source: str | None = None, timeout: float = 5.0) -> bytes:
    """Send one raw request on a new connection; the whole answer (up to the server closing)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def timed_version_check(server: Server) -> float:
    """Seconds `GET /v2/` takes on a new connection (any HTTP answer counts: 401 in token mode)."""
    host, port = server.host.split(":")
    started = time.monotonic()
    answer = await http(host, int(port), f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n"
                        .encode(), timeout=30)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return time.monotonic() - started


async def stall(host: str, port: int, requests: list[bytes]) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open one connection per request, send it (never complete), keep the connections."""
    connections = []
    for start in range(0, len(requests), 50):  # stay within the listen backlog
        batch = await asyncio.gather(*[asyncio.open_connection(host, port) for _ in requests[start:start + 50]])
        for (reader, writer), request in zip(batch, requests[start:start + 50]):
            writer.write(request)
        connections += batch
    for _reader, writer in connections:
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server refused the request already
    return connections


async def closed_by_server(connections, within: float) -> int:
    """How many of `connections` the server closes within `within` seconds."""
    async def wait_closed(reader: asyncio.StreamReader) -> bool:
        try:
            while await reader.read(65536):
                pass
            return True
        except ConnectionError:
            return True

    results = await asyncio.gather(*[asyncio.wait_for(wait_closed(r), within) for r, _ in connections],
                                   return_exceptions=True)
    for _r, writer in connections:
        writer.close()
    return sum(result is True for result in results)


class PeakRss:
    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, status(self.pid, "VmRSS"))
            await asyncio.sleep(0.02)


async def token(server: Server, scope: str) -> str:
    host, port = server.host.split(":")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    answer = await http(host, int(port), (f"GET /auth/token?service=kura&scope={scope} HTTP/1.1\r\n"
                                          f"Host: {server.host}\r\nAuthorization: Basic {basic}\r\n"
                                          "Connection: close\r\n\r\n").encode())
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["token"]


async def upload_sessions(server: Server, repo: str, count: int, headers: str) -> list[str]:
    host, port = server.host.split(":")

    async def one() -> str:
        answer = await http(host, int(port), (f"POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: {server.host}\r\n"
                                              f"{headers}Content-Length: 0\r\nConnection: close\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
        return next(line.split(b": ", 1)[1].decode() for line in answer.split(b"\r\n")
                    if line.lower().startswith(b"location: "))

    locations = []
    for start in range(0, count, 50):
        locations += await asyncio.gather(*[one() for _ in range(min(50, count - start))])
    return locations


def token_stall_requests(server: Server) -> list[bytes]:
    """Half declare 1 MiB and send all but a few bytes of it; half declare a small form and
    send a few bytes of it."""
    def post(length: int, body: bytes) -> bytes:
        return (f"POST /auth/token HTTP/1.1\r\nHost: {server.host}\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {length}\r\n\r\n").encode() + body
    large = b"grant_type=password&username=alice&password=" + b"x" * (MIB - 100)
    return [post(MIB, large) if i % 2 else post(2000, b"grant_type=pass") for i in range(STALLS)]


def patch_stall_requests(server: Server, locations: list[str], headers: str) -> list[bytes]:
    """PATCHes that declare 1 MiB; half send a few bytes of it, half all but a few bytes."""
    def patch(location: str, body: bytes) -> bytes:
        return (f"PATCH {location} HTTP/1.1\r\nHost: {server.host}\r\n{headers}"
                f"Content-Type: application/octet-stream\r\nContent-Length: {MIB}\r\n\r\n").encode() + body
    return [patch(location, os.urandom(MIB - 16) if i % 2 else b"abcd") for i, location in enumerate(locations)]


async def stall_and_measure(server: Server, requests: list[bytes]) -> tuple[int, int, float, int, int]:
    """(RSS before, peak RSS while the stalls are held, slowest GET /v2/ meanwhile, sockets the
    server held then, how many stalled connections it closed within the body timeout + margin)."""
    host, port = server.host.split(":")
    pid = server.process.pid
    before = status(pid, "VmRSS")
    sampler = PeakRss(pid)
    sampling = asyncio.create_task(sampler.run())
    try:
        connections = await stall(host, int(port), requests)
        await asyncio.sleep(0.5)
        held = open_sockets(pid)
        slowest = max([await timed_version_check(server) for _ in range(3)])
    finally:
        sampling.cancel()
    peak = max(sampler.peak, status(pid, "VmHWM"))
    closed = await closed_by_server(connections, BODY_TIMEOUT + 15)
    return before, peak, slowest, held, closed


SERVER_LIMITS = {"body_timeout_seconds": BODY_TIMEOUT, "max_connections": 2000, "max_connections_per_client": 0}


@pytest.mark.parametrize("target", ["token endpoint", "upload PATCH"])
def test_stalled_bodies_are_bounded_and_timed_out(tmp_path, target):
    raise_own_fd_limit(4 * STALLS)
    server = serve(tmp_path, "token", server=SERVER_LIMITS,
                   uploads={"max_sessions_per_user": STALLS, "max_sessions_per_repository": STALLS})
    try:
        async def scenario():
            if target == "token endpoint":
                requests = token_stall_requests(server)
            else:
                auth = f"Authorization: Bearer {await token(server, 'repository:stall/app:pull,push')}\r\n"
                locations = await upload_sessions(server, "stall/app", STALLS, auth)
                requests = patch_stall_requests(server, locations, auth)
            return await stall_and_measure(server, requests)

        before, peak, slowest, held, closed = asyncio.run(scenario())
    finally:
        stop(server)
    print(f"{target}: {STALLS} stalled connections: server RSS {before / MIB:.0f} MiB before, peak "
          f"{peak / MIB:.0f} MiB; slowest GET /v2/ {slowest * 1000:.0f} ms; server sockets {held}; "
          f"closed by the server {closed}")
    assert held >= STALLS  # the measurements were taken while the stalls were held
    assert peak < RSS_LIMIT
    assert slowest < 1.0
    assert closed == STALLS
    assert "Traceback" not in log_text(tmp_path)


async def wait_closed(reader: asyncio.StreamReader, within: float) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent meanwhile)."""
    started = time.monotonic()
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), max(0.01, within - (time.monotonic() - started))):
            received += chunk
    except ConnectionError:
        pass
    return time.monotonic() - started, received


def test_slow_heads_and_idle_connections_are_closed(tmp_path):
    server = serve(tmp_path, server={"header_timeout_seconds": 1, "idle_timeout_seconds": 4},
                   limits={"max_header_bytes": 16384})
    host, port = server.host.split(":")
    try:
        async def scenario():
            # An idle keep-alive connection, after one answered request.
            idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
            idle_writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
            assert (await idle_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await idle_reader.readexactly(2)  # the body, {}
            idle = asyncio.create_task(wait_closed(idle_reader, 15))
            # A head sent a line at a time, never finished: still sending, but too slowly.
            slow_reader, slow_writer = await asyncio.open_connection(host, int(port))
            slow_writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\n".encode())

            async def drip():
                for i in range(40):
                    await asyncio.sleep(0.25)
                    slow_writer.write(f"X-Slow-{i}: x\r\n".encode())

            dripping = asyncio.create_task(drip())
            try:
                slow = await wait_closed(slow_reader, 10)
            finally:
                dripping.cancel()
            # A head larger than limits.max_header_bytes.
            big = await http(host, int(port), f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\n".encode()
                             + b"".join(b"X-Big-%d: %s\r\n" % (i, b"x" * 1000) for i in range(40)) + b"\r\n")
            # A body whose last read is larger than the head limit: body, not head.
            blob = os.urandom(300_000)
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST /v2/a/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {server.host}\r\n"
                         f"Content-Length: {len(blob)}\r\n\r\n".encode() + blob[:-20_000])
            await asyncio.sleep(0.3)
            writer.write(blob[-20_000:])
            two = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n".encode())
            two += await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return slow, big, two, await idle

        (slow_seconds, _), big, two, (idle_seconds, idle_extra) = asyncio.run(scenario())
        assert slow_seconds < 3.5  # server.header_timeout_seconds = 1, not the idle timeout of 4
        assert big.startswith(b"HTTP/1.1 431")
        assert two.startswith(b"HTTP/1.1 201") and two.count(b"HTTP/1.1 200 OK") == 1, two
        assert 3 < idle_seconds < 10 and idle_extra == b""
    finally:
        stop(server)


def server_sockets_settle(pid: int, at_most: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while (count := open_sockets(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


async def flood(host: str, port: int, source: str, count: int, connect_timeout: float = 5) -> list:
    """Open `count` connections from the loopback address `source` and send nothing."""
    connections = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(*[asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(source, 0)),
                                                        connect_timeout)
                                       for _ in range(min(100, count - start))], return_exceptions=True)
        connections += [c for c in batch if isinstance(c, tuple)]
    return connections


def test_idle_connections_beyond_the_caps_do_not_lock_out_other_clients(tmp_path):
    raise_own_fd_limit(4000)
    server = serve(tmp_path, server={"max_connections": 100, "max_connections_per_client": 20})
    host, port = server.host.split(":")
    pid = server.process.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, 1024))  # a common default
    own_sockets = open_sockets(pid)  # listening, the event loop's self-pipe
    try:
        async def scenario():
            held = await flood(host, int(port), "127.0.0.2", 1100)  # one client, far over its cap
            for n in range(3, 10):  # seven more, together over the total cap
                held += await flood(host, int(port), f"127.0.0.{n}", 20)
            sockets = await asyncio.to_thread(server_sockets_settle, pid, own_sockets + 100)
            answers = [await http(host, int(port), f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\n"
                                  "Connection: close\r\n\r\n".encode(), timeout=5) for _ in range(3)]
            for _reader, writer in held:
                writer.close()
            return sockets, answers

        sockets, answers = asyncio.run(scenario())
    finally:
        stop(server)
    assert sockets <= own_sockets + 100
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
    log = log_text(tmp_path)
    assert "Traceback" not in log
    assert 1 <= log.count("connection limits reached") <= 3  # rate-limited, though 1,000+ times


def test_running_out_of_descriptors_logs_one_line_not_a_traceback_each_time(tmp_path):
    raise_own_fd_limit(4000)
    server = serve(tmp_path, server={"max_connections": 5000, "max_connections_per_client": 0})
    host, port = server.host.split(":")
    pid = server.process.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (128, 128))  # lowered behind its back
    try:
        async def scenario():
            # Once it cannot accept, the listen backlog fills and further connects time out.
            held = await flood(host, int(port), "127.0.0.1", 300, connect_timeout=1)
            await asyncio.sleep(2)
            for _reader, writer in held:
                writer.close()
            deadline = time.monotonic() + 10
            while True:  # accepting resumes once descriptors are free again
                try:
                    return await http(host, int(port), f"GET /v2/ HTTP/1.1\r\nHost: {server.host}\r\n"
                                      "Connection: close\r\n\r\n".encode(), timeout=2)
                except (OSError, asyncio.TimeoutError):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)

        answer = asyncio.run(scenario())
    finally:
        stop(server)
    assert answer.startswith(b"HTTP/1.1 200")
    log = log_text(tmp_path)
    assert "Traceback" not in log
    assert 1 <= log.count("cannot accept connections") <= 2
    assert "Too many open files" in log


def test_gzip_encoded_body_is_stored_as_sent(tmp_path):
    """`kura serve` does not inflate request bodies (64 KiB here would be 64 MiB)."""
    wire = gzip.compress(bytes(64 * MIB))
    digest = "sha256:" + hashlib.sha256(wire).hexdigest()
    server = serve(tmp_path)
    host, port = server.host.split(":")
    try:
        answer = asyncio.run(http(host, int(port), (
            f"POST /v2/gz/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {server.host}\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(wire)}\r\nConnection: close\r\n\r\n").encode() + wire))
    finally:
        stop(server)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    assert (tmp_path / "data" / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes() == wire
