"""Registry credentials from Docker's `config.json` (what docker, skopeo and podman share).

`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`: `credHelpers` per host,
then `auths` (base64 `auth`, or `username`/`password`), then the `credsStore` helper.
A helper is run as `docker-credential-<name> get` with the server on stdin.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ocispec.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

DOCKER_HUB_KEY = "https://index.docker.io/v1/"


class CredentialsError(ValueError):
    pass


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a secret by accident
        return f"Credentials(username={self.username!r}, password=***)"


def config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def server_key(host: str) -> str:
    return DOCKER_HUB_KEY if host in DOCKER_HUB_ALIASES or host == DOCKER_HUB else host


def _matches(key: str, host: str) -> bool:
    if key == host:
        return True
    stripped = key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return stripped == host


def lookup(host: str, path: Path | None = None) -> Credentials | None:
    path = path or config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k) or {}, dict) for k in ("auths", "credHelpers")):
        raise CredentialsError(f"{path} is not a Docker config (a JSON object)")
    key = server_key(host)
    hub = key == DOCKER_HUB_KEY
    helpers = config.get("credHelpers") or {}
    for name, helper in helpers.items():
        if _matches(name, host) or (hub and _matches(name, "index.docker.io")):
            return run_helper(helper, key)
    for name, entry in (config.get("auths") or {}).items():
        if _matches(name, key) or _matches(name, host) or (hub and _matches(name, "index.docker.io")):
            found = _from_entry(entry, name, path)
            if found:
                return found
    if config.get("credsStore"):
        return run_helper(config["credsStore"], key)
    return None


def _from_entry(entry: dict, name: str, path: Path) -> Credentials | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{path}: the auth entry for {name} is not base64 user:password") from None
        if sep:
            return Credentials(user, password)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(entry["username"], entry["password"])
    return None


def run_helper(helper: str, server: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CredentialsError(f"credential helper {program} is configured but not installed") from None
    if result.returncode != 0:
        if "credentials not found" in (result.stdout + result.stderr).lower():
            return None
        raise CredentialsError(f"{program} get failed: {result.stderr.strip() or result.stdout.strip()}")
    try:
        answer = json.loads(result.stdout)
        return Credentials(answer["Username"], answer["Secret"])
    except (ValueError, KeyError):
        raise CredentialsError(f"{program} get answered something that is not credentials") from None


def save(host: str, credentials: Credentials, path: Path | None = None) -> str:
    """Store a login the way docker does; returns where it went. Other keys are kept."""
    path = path or config_path()
    with _config_lock(path):
        config = _load_for_update(path)
        key = server_key(host)
        helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
        _drop_inline(config, host, key)  # an older entry would otherwise shadow the new login
        if helper:
            _run_helper_action(helper, "store", json.dumps({"ServerURL": key, "Username": credentials.username,
                                                            "Secret": credentials.password}))
            _write_config(path, config)
            return f"docker-credential-{helper}"
        auth = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
        config.setdefault("auths", {})[key] = {"auth": auth}
        _write_config(path, config)
        return str(path)


def erase(host: str, path: Path | None = None) -> bool:
    path = path or config_path()
    with _config_lock(path):
        config = _load_for_update(path)
        key = server_key(host)
        helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
        dropped = _drop_inline(config, host, key)
        if dropped:
            _write_config(path, config)
        if helper:
            _run_helper_action(helper, "erase", key)
            return True
        return dropped


def _drop_inline(config: dict, host: str, key: str) -> bool:
    auths = config.get("auths") or {}
    names = [name for name in auths if _matches(name, key) or _matches(name, host)]
    for name in names:
        del auths[name]
    return bool(names)


@contextlib.contextmanager
def _config_lock(path: Path):
    """Serialise read-modify-write of config.json between concurrent `kura login`s, leaving
    nothing behind in the user's Docker config folder.

    The lock is a file beside config.json (not config.json itself, which every write replaces
    by rename, nor the folder, which cannot be flocked exclusively on NFS). Its holder unlinks
    it before letting go; so whoever was waiting on that file then finds it no longer at its
    path, and starts again on the file that is there now. The lock held is always the one on
    the file at the path, and only its holder removes it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = path.parent / f".{path.name}.kura.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, current = os.fstat(fd), os.stat(lock)
        except FileNotFoundError:  # unlinked by the holder we waited for
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(fd)  # a stale file: a newer one is at the path now
    try:
        yield
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(lock)
                if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                    os.unlink(lock)
        finally:
            os.close(fd)


def _load_for_update(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("auths") or {}, dict):
        raise CredentialsError(f"{path} is not a Docker config (a JSON object with an auths object)")
    return config


def _write_config(path: Path, config: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique, 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent="\t")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run_helper_action(helper: str, action: str, payload: str) -> None:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, action], input=payload, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CredentialsError(f"credential helper {program} is configured but not installed") from None
    if result.returncode != 0:
        raise CredentialsError(f"{program} {action} failed: {result.stderr.strip() or result.stdout.strip()}")
