"""What `kura serve` logs when a client breaks off: one INFO line naming the request and what
broke, not a traceback; and a TLS handshake sent to the plain-HTTP port is one DEBUG line
with the peer, not an access-log entry (it is still answered in HTTP, so that a Go client
can say "server gave HTTP response to HTTPS client")."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import time
import urllib.request

import pytest

from tests.support.servers import start_kura, stop

pytestmark = pytest.mark.e2e
MIB = 1 << 20


def kura_lines(log) -> list[str]:
    """Log lines of Kura itself (not the access log), after checking there is no traceback."""
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text
    return [line for line in text.splitlines() if " kura." in line]


def reset(sock: socket.socket) -> None:
    """Close with a RST, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_for(log, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_client_gone_mid_download(tmp_path):
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, log=log)
    try:
        blob = os.urandom(64 * MIB)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v2/big/blobs/uploads/?digest={digest}", data=blob, method="POST")).read()
        host, port = server.host.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.2)
            reset(sock)
        wait_for(log, f'"GET /v2/big/blobs/{digest} HTTP/1.1"')  # the access log: the request is over
    finally:
        stop(server)
    lines = [line for line in kura_lines(log) if f"/v2/big/blobs/{digest}" in line]
    assert len(lines) == 1, log.read_text()
    assert " INFO " in lines[0] and f"GET /v2/big/blobs/{digest}" in lines[0]
    assert "client went away during the response" in lines[0], lines[0]


def test_client_gone_mid_upload(tmp_path):
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, log=log)
    try:
        answer = urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/up/blobs/uploads/", method="POST"))
        location = answer.headers["Location"]
        host, port = server.host.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"PATCH {location} HTTP/1.1\r\nHost: {server.host}\r\nContent-Length: {10 * MIB}\r\n"
                         "Content-Type: application/octet-stream\r\n\r\n".encode())
            sock.sendall(bytes(3 * MIB))
            time.sleep(0.2)
            reset(sock)
        wait_for(log, f'"PATCH {location} HTTP/1.1"')
        with urllib.request.urlopen(f"{server.url}{location}") as status:  # the session is still usable
            assert status.status == 204
    finally:
        stop(server)
    lines = [line for line in kura_lines(log) if location in line]
    assert len(lines) == 1, log.read_text()
    assert " INFO " in lines[0] and f"PATCH {location}" in lines[0]
    assert "client went away during the request body" in lines[0], lines[0]


def client_hello() -> bytes:
    context = ssl.create_default_context()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_handshake_on_the_plain_port(tmp_path):
    config = tmp_path / "kura.toml"
    config.write_text('[log]\nlevel = "debug"\naccess_log = true\n')
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, "--config", str(config), log=log)
    try:
        host, port = server.host.split(":")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection((host, int(port))) as raw:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname=host)
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(client_hello())
            assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")  # an HTTP answer, for clients to recognise
        urllib.request.urlopen(f"{server.url}/v2/").read()
        wait_for(log, '"GET /v2/ HTTP/1.1" 200')
    finally:
        stop(server)
    text = log.read_text()
    assert "UNKNOWN" not in text and "Traceback" not in text, text
    access = [line for line in text.splitlines() if "aiohttp.access" in line]
    assert len(access) == 2, access  # start_kura's readiness check and ours, not the handshakes
    tls = [line for line in text.splitlines() if "TLS handshake" in line]
    assert len(tls) == 2 and all(" DEBUG " in line and "from 127.0.0.1" in line for line in tls), text
