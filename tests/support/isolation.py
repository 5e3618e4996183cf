"""Tests never touch the user's own data: each runs with its own HOME, XDG directories and Docker
config, and a guard compares the user's real locations before and after the run."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

# Every variable through which a client (kura, skopeo, docker) finds per-user state.
PER_USER_VARIABLES = ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
                      "XDG_RUNTIME_DIR", "DOCKER_CONFIG")
# Pointers at one particular file of the user's: a test that wants one sets its own.
UNSET_VARIABLES = ("REGISTRY_AUTH_FILE", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_AUTH_FILE")
# Work files of the tools, inside the repository, that a test run may create.
REPO_NOISE = {".git", ".venv", "__pycache__", ".pytest_cache", "build"}


def isolated_environment(base: Path) -> dict[str, str]:
    """The per-user variables pointing into `base` (directories created, private)."""
    values = {"HOME": base / "home", "XDG_DATA_HOME": base / "xdg-data", "XDG_CONFIG_HOME": base / "xdg-config",
              "XDG_CACHE_HOME": base / "xdg-cache", "XDG_STATE_HOME": base / "xdg-state",
              "XDG_RUNTIME_DIR": base / "xdg-runtime", "DOCKER_CONFIG": base / "docker"}
    for path in values.values():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return {name: str(path) for name, path in values.items()}


def apply(environment: dict[str, str], setenv, delenv) -> None:
    for name, value in environment.items():
        setenv(name, value)
    for name in UNSET_VARIABLES:
        delenv(name)


def watched_locations(environ: dict[str, str]) -> list[Path]:
    """The user's real per-user directories a registry client writes to."""
    home = Path(environ.get("HOME") or Path.home())
    data = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    config = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    runtime = Path(environ.get("XDG_RUNTIME_DIR") or "/run")  # skopeo's auth.json as root: /run/containers/0
    docker = Path(environ.get("DOCKER_CONFIG") or home / ".docker")
    return [docker, data / "kura", data / "containers", config / "containers", runtime / "containers"]


@dataclass
class Snapshot:
    """Files (with mtime and size) under the watched directories, the entries of HOME, and the
    files of the repository outside the tools' work directories."""
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)

    @classmethod
    def take(cls, watched: list[Path], home: Path, repo: Path) -> "Snapshot":
        snapshot = cls()
        for top in watched:
            for path in _walk(top):
                with contextlib.suppress(FileNotFoundError):
                    info = path.lstat()
                    snapshot.files[str(path)] = (info.st_mtime_ns, info.st_size)
        if home.is_dir():
            snapshot.names.update(str(entry) for entry in home.iterdir())
        snapshot.names.update(str(path) for path in _walk(repo, skip=REPO_NOISE))
        return snapshot

    def changes_since(self, before: "Snapshot") -> list[str]:
        found = [f"written: {path}" for path, state in self.files.items() if before.files.get(path) != state]
        found += [f"removed: {path}" for path in before.files if path not in self.files]
        found += [f"created: {path}" for path in self.names - before.names]
        return sorted(found)


def _walk(top: Path, skip: set[str] = frozenset()):
    if not top.exists():
        return
    yield top
    for directory, subdirs, files in os.walk(top):
        subdirs[:] = [d for d in subdirs if d not in skip and not d.endswith(".egg-info")]
        for name in subdirs + files:
            yield Path(directory) / name
