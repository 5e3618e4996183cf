"""Registry credentials from Docker's `config.json` (what docker, skopeo and podman share).

`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`: `credHelpers` per host,
then `auths` (base64 `auth`, or `username`/`password`), then the `credsStore` helper.
A helper is run as `docker-credential-<name> get` with the server on stdin.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
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
    config = _load_for_update(path)
    key = server_key(host)
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        _run_helper_action(helper, "store", json.dumps({"ServerURL": key, "Username": credentials.username,
                                                        "Secret": credentials.password}))
        return f"docker-credential-{helper}"
    auth = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    config.setdefault("auths", {})[key] = {"auth": auth}
    _write_config(path, config)
    return str(path)


def erase(host: str, path: Path | None = None) -> bool:
    path = path or config_path()
    config = _load_for_update(path)
    key = server_key(host)
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        _run_helper_action(helper, "erase", key)
        return True
    auths = config.get("auths") or {}
    names = [name for name in auths if _matches(name, key) or _matches(name, host)]
    for name in names:
        del auths[name]
    if names:
        _write_config(path, config)
    return bool(names)


def _load_for_update(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    return config


def _write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.kura.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent="\t")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_helper_action(helper: str, action: str, payload: str) -> None:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, action], input=payload, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CredentialsError(f"credential helper {program} is configured but not installed") from None
    if result.returncode != 0:
        raise CredentialsError(f"{program} {action} failed: {result.stderr.strip() or result.stdout.strip()}")
