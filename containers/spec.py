"""The OCI runtime config of a container: the image config's `config` section with `kura run`'s
options applied as `docker run` applies them.

Choices where Docker differs by set-up:
- The container always gets its own UTS namespace named by -h (else the id's first 12 hex digits),
  also with --network host, where Docker would use the host's hostname: a container cannot rename
  the host, and HOSTNAME always matches `hostname`.
- --network host shares the host's network namespace and binds the host's /etc/hosts and
  /etc/resolv.conf read-only over the image's; --network none gives a new namespace (runc brings up
  its loopback) and leaves the image's files.
- -i changes nothing here: the caller passes its stdin through (terminal stays false).
- HOME is set from the user's /etc/passwd entry when no Env names it, as runc does.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from puller.bundle import DEFAULT_PATH, BundleError, UnknownUser, check_config, exec_user, oci_config

NETWORKS = ("host", "none")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf")  # shared with the host under --network host


@dataclass(frozen=True)
class RunOptions:
    command: tuple[str, ...] = ()      # CMD ARGS given after IMAGE (replace the image's Cmd)
    entrypoint: str | None = None      # --entrypoint ("" clears the image's Entrypoint)
    env: tuple[str, ...] = ()          # -e K=V (K alone: the caller's value), override the image's Env
    workdir: str | None = None         # -w
    user: str | None = None            # -u NAME|UID[:GROUP|GID]
    hostname: str | None = None        # -h
    volumes: tuple[str, ...] = ()      # -v HOST:CTR[:ro]
    network: str = "host"              # "host" | "none"
    interactive: bool = False          # -i: stdin passed through


class SpecError(ValueError):
    """A `kura run` option that cannot make a container: one line for the user."""


def runtime_spec(image_config: dict, rootfs: Path, options: RunOptions, hostname: str) -> dict:
    """The runtime config.json for `runc run`, its root.path the absolute `rootfs` (whose
    /etc/passwd and /etc/group resolve the user)."""
    try:
        check_config(image_config)
    except BundleError as exc:
        raise SpecError(str(exc)) from None
    image = image_config.get("config") or {}
    if options.network not in NETWORKS:
        raise SpecError(f"unknown network {options.network!r}: use host or none")
    hostname = options.hostname or hostname
    user = _user(options.user or image.get("User") or "", rootfs)
    env = environment(image.get("Env") or [], options.env, hostname, os.environ)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")
    config = oci_config(command_line(image, options), env, working_dir(options.workdir, image.get("WorkingDir")),
                        {"uid": user.uid, "gid": user.gid, "additionalGids": [user.gid, *user.additional_gids]},
                        image.get("Labels") or {})
    config["root"] = {"path": os.path.abspath(rootfs), "readonly": False}
    config["hostname"] = hostname
    config["mounts"] = mounts(config["mounts"], options.volumes, options.network)
    namespaces = config["linux"]["namespaces"]
    if options.network == "host":
        config["linux"]["namespaces"] = [ns for ns in namespaces if ns["type"] != "network"]
    return config


def command_line(image: dict, options: RunOptions) -> list[str]:
    """Entrypoint + Cmd; CMD ARGS replace Cmd; --entrypoint replaces Entrypoint and drops the
    image's Cmd ("" clears it)."""
    if options.entrypoint is None:
        entrypoint = list(image.get("Entrypoint") or [])
        cmd = list(options.command) or list(image.get("Cmd") or [])
    else:
        entrypoint = [options.entrypoint] if options.entrypoint else []
        cmd = list(options.command)
    if not entrypoint + cmd:
        raise SpecError("no command specified")
    return entrypoint + cmd


def environment(image_env: list[str], flags: tuple[str, ...], hostname: str,
                caller: Mapping[str, str]) -> list[str]:
    """PATH (the default unless set), HOSTNAME, then the -e values and the image's Env that no -e
    names, as Docker merges them. `-e K` takes the caller's K, or unsets K when the caller has none;
    a later -e of a key replaces an earlier one."""
    given = []
    for item in flags:
        key, eq, _ = item.partition("=")
        if not key:
            raise SpecError(f"invalid environment variable: {item}")
        if not eq and key in caller:
            item = f"{key}={caller[key]}"
        given.append(item)
    keys = {item.partition("=")[0] for item in given}
    merged = given + [item for item in image_env if item.partition("=")[0] not in keys]
    env = [DEFAULT_PATH, f"HOSTNAME={hostname}"]
    for item in merged:
        key, eq, _ = item.partition("=")
        at = next((i for i, e in enumerate(env) if e.partition("=")[0] == key), None)
        if not eq:
            if at is not None:
                del env[at]
        elif at is None:
            env.append(item)
        else:
            env[at] = item
    return env


def working_dir(flag: str | None, image_dir: str | None) -> str:
    if flag:
        if not flag.startswith("/"):
            raise SpecError(f"the working directory {flag!r} is invalid: it needs to be an absolute path")
        return _absolute(flag)
    return _absolute(image_dir or "/")


def _absolute(path: str) -> str:
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def _user(spec: str, rootfs: Path):
    try:
        return exec_user(spec, rootfs)
    except UnknownUser as exc:
        raise SpecError(str(exc)) from None
    except BundleError as exc:  # an id out of range
        raise SpecError(f"user {spec}: {exc}") from None


def mounts(defaults: list[dict], volumes: tuple[str, ...], network: str) -> list[dict]:
    """runc's default mounts, the host's name files under --network host, then the volumes in the
    order of their depth (a parent before what is mounted inside it); a volume at a default
    mount's destination replaces it."""
    binds = [volume(v) for v in volumes]
    destinations = [b["destination"] for b in binds]
    for destination in destinations:
        if destinations.count(destination) > 1:
            raise SpecError(f"duplicate mount point: {destination}")
    extra = []
    if network == "host":
        extra = [_bind(path, path, read_only=True) for path in HOST_FILES if os.path.exists(path)]
    kept = [m for m in defaults + extra if m["destination"] not in destinations]
    return kept + sorted(binds, key=lambda b: b["destination"].count("/"))


def volume(spec: str) -> dict:
    """`HOST:CTR[:ro|rw]` -> a recursive bind mount of the existing absolute HOST path at CTR."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise SpecError(f"invalid volume {spec!r}: use HOST:CTR or HOST:CTR:ro")
    host, container = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise SpecError(f"invalid volume {spec!r}: the mode is ro or rw, not {mode!r}")
    if not host.startswith("/"):
        raise SpecError(f"invalid volume {spec!r}: the host path must be absolute (no named volumes)")
    if not os.path.exists(host):
        raise SpecError(f"invalid volume {spec!r}: {host} does not exist")
    if not container.startswith("/"):
        raise SpecError(f"invalid volume {spec!r}: the container path must be absolute")
    if _absolute(container) == "/":
        raise SpecError(f"invalid volume {spec!r}: the container path cannot be /")
    return _bind(os.path.normpath(host), _absolute(container), read_only=mode == "ro")


def _bind(source: str, destination: str, read_only: bool) -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "rprivate"] + (["ro"] if read_only else [])}
