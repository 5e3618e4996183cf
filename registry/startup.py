"""What `kura serve` checks before it listens. Anything that would stop it becomes a
StartupError: one line naming the path or address at fault, never a traceback. What it
should tell the operator once it is listening is collected as notes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import select
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from storage import FilesystemDriver, StorageDriver, StorageError
from storage.atomic import make_dirs
from storage.errors import FULL_ERRNOS

from .app import make_app
from .auth.controller import AUTH, AuthSetupError, startup_report
from .config import Config



class StartupError(Exception):
    pass


@dataclass
class Ready:
    """Everything `kura serve` needs to listen, and what to log once it does."""
    app: web.Application
    ssl_context: ssl.SSLContext | None
    notes: list[tuple[int, str]] = field(default_factory=list)


def reason(exc: OSError) -> str:
    """`address already in use`, `no such file or directory`: the errno's text, lower case."""
    if isinstance(exc, socket.gaierror) or not isinstance(exc.errno, int):
        text = exc.strerror or str(exc)
    else:
        text = os.strerror(exc.errno)
    return text[:1].lower() + text[1:]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare(config: Config, *, forks_workers: bool = False) -> Ready:
    """What `kura serve` checks and builds before it listens. `forks_workers`: the caller forks
    worker processes from this one afterwards, which must then not have used the S3 client
    (see open_store)."""
    context = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    driver, notes = open_store(config, probe_in_child=forks_workers)
    try:
        app = make_app(config, driver)
    except AuthSetupError as exc:
        raise StartupError(str(exc)) from None
    plain_off_loopback = context is None and not is_loopback(config.host)
    try:
        notes += startup_report(app[AUTH], config.listen, plain_off_loopback)
    except OSError as exc:
        raise StartupError(f"cannot read the accounts file {exc.filename}: {reason(exc)}") from None
    scheme = "https" if context else "http"
    notes.append((logging.INFO, f"serving registry on {scheme}://{config.listen} (storage {describe_store(config)})"))
    return Ready(app, context, notes)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {reason(exc)}") from None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for server.tls_cert/tls_key; which file is wrong, and how, if one is."""
    from cryptography import x509  # several MiB a process: only when TLS is configured
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(cert, "the TLS certificate")
    key_pem = _read(key, "the TLS key")
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise StartupError(f"{cert} holds no PEM certificate (server.tls_cert)") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise StartupError(f"{key} holds no usable PEM private key (server.tls_key; it must not be "
                           "protected by a passphrase)") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(f"the TLS key {key} does not belong to the certificate {cert} "
                               "(server.tls_key, server.tls_cert)") from None
        raise StartupError(f"cannot use the TLS certificate {cert} with the key {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise StartupError(f"cannot read the TLS files {cert}, {key}: {reason(exc)}") from None
    return context


def describe_store(config: Config) -> str:
    if config.storage_driver == "s3":
        s3 = config.s3
        where = s3.endpoint or f"AWS {s3.region}"
        return f"s3://{s3.bucket}/{s3.prefix.strip('/')} at {where}"
    return str(Path(os.path.abspath(config.root)))


def open_store(config: Config, *, probe_in_child: bool = False) -> tuple[StorageDriver, list[tuple[int, str]]]:
    """The configured store, checked to take a write. The local root is made ready in either
    case: accounts, token keys and the cache's spool files live there.

    `probe_in_child`: the S3 check runs in a forked child process. The S3 client (obstore)
    starts a runtime of threads on first use, and a process forked after that inherits it
    without its threads: every request of a worker forked from it would wait forever."""
    driver, notes = open_local_store(config.root)
    if config.storage_driver != "s3":
        return driver, notes
    remote = s3_driver(config)
    s3 = config.s3
    try:
        created = _in_child(lambda: asyncio.run(_open_remote(remote))) if probe_in_child \
            else asyncio.run(_open_remote(remote))
    except StorageError as exc:
        raise StartupError(f"cannot use the S3 store {describe_store(config)}: {exc}") from None
    if created:
        notes.append((logging.INFO, f"created the bucket {s3.bucket}"))
    return remote, notes


def s3_driver(config: Config):
    """The S3 driver for [storage.s3] (the bucket is not touched yet)."""
    from storage.s3 import S3Driver
    from storage.s3_objects import S3Location

    s3 = config.s3
    location = S3Location(s3.endpoint, s3.region, s3.bucket, s3.prefix, s3.access_key, s3.secret_key)
    return S3Driver(location, redirect=s3.redirect, redirect_seconds=s3.redirect_seconds)


# The store's requests time out well within this (storage/s3_objects.py).
CHILD_CHECK_SECONDS = 120.0


def _in_child(probe: Callable[[], bool]) -> bool:
    """`probe()` run in a forked child; its StorageError raised here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            try:
                answer = b"created" if probe() else b"ok"
            except StorageError as exc:
                answer = b"error " + str(exc).encode()
            except BaseException as exc:  # reported, not raised: the child must not go on as the server
                answer = b"error " + f"{type(exc).__name__}: {exc}".encode()
            os.write(write_end, answer[:65536])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    answer = b""
    deadline = time.monotonic() + CHILD_CHECK_SECONDS
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0 and select.select([pipe], [], [], left)[0]:
            piece = pipe.read(65536)
            if not piece:
                break
            answer += piece
        else:
            os.kill(pid, signal.SIGKILL)
            answer = f"error no answer within {CHILD_CHECK_SECONDS:g} s".encode()
    os.waitpid(pid, 0)
    if answer.startswith(b"error "):
        raise StorageError(answer[len(b"error "):].decode(errors="replace"))
    if answer not in (b"created", b"ok"):
        raise StorageError("the check of the store ended without an answer")
    return answer == b"created"


async def _open_remote(driver) -> bool:
    try:
        return await driver.open()
    finally:
        await driver.close()


def open_local_store(configured: Path) -> tuple[FilesystemDriver, list[tuple[int, str]]]:
    """The store at `configured`, created if missing (only when its parent exists: a typo in
    storage.root should not grow a tree somewhere), and checked to take a write."""
    root = Path(os.path.abspath(configured))
    if root.exists() and not root.is_dir():
        raise StartupError(f"storage root {root} is not a directory")
    if not root.exists():
        if not root.parent.is_dir():
            raise StartupError(f"storage root {root} does not exist, nor does its parent {root.parent}; "
                               "create it first (or fix storage.root)")
        try:
            make_dirs(root)
        except OSError as exc:
            raise StartupError(f"cannot create the storage root {root}: {reason(exc)}") from None
    try:
        driver = FilesystemDriver(root)
    except OSError as exc:
        raise StartupError(f"cannot create {exc.filename or root}: {reason(exc)}") from None
    notes = []
    probe = driver.layout.tmp / f".write-test-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"kura")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise StartupError(f"storage root {root} is not writable: {reason(exc)}") from None
        # Pulls still work; pushes are answered 507 until space is freed.
        notes.append((logging.WARNING, f"storage root {root} is full ({reason(exc)}): pushes will fail "
                                       "with 507 Insufficient Storage until space is freed"))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return driver, notes
