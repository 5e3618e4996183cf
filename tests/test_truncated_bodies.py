"""A registry that closes the connection in the middle of a small body (manifest, tag list):
the client ends in one `kura:` line, never a traceback."""

import asyncio

import pytest

from tests.support.cli import run_kura


async def _request_path(reader: asyncio.StreamReader) -> bytes | None:
    """The path of the next plain-HTTP GET; None for anything else (the client's HTTPS probe
    first sends a TLS handshake, which is refused so that it falls back to HTTP)."""
    if await reader.read(1) != b"G":
        return None
    path = (await reader.readline()).split()[1]
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return path


async def _truncating_registry(path_prefix: bytes, declared: int, sent: bytes):
    """Answers 200 `{}` to everything but paths under `path_prefix`, for which it promises
    `declared` bytes, sends `sent` and hangs up."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (path := await _request_path(reader)) is not None:
                if path.startswith(path_prefix):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 + f"Content-Length: {declared}\r\n\r\n".encode() + sent)
                    await writer.drain()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                await writer.drain()
        finally:
            writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("command, prefix", [
    (("pull", "-q"), b"/v2/x/manifests/"),
    (("inspect",), b"/v2/x/manifests/"),
    (("tags",), b"/v2/x/tags/"),
])
async def test_body_cut_short_is_a_one_line_error(command, prefix):
    server = await _truncating_registry(prefix, 1000, b'{"schema')
    port = server.sockets[0].getsockname()[1]
    async with server:
        reference = f"127.0.0.1:{port}/x" + ("" if command[0] == "tags" else ":y")
        ran = await run_kura(*command, reference)
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kura: ") and "connection broke" in lines[0], ran.stderr
