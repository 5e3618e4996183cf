"""The suite never touches the user's data: per-test HOME/XDG/DOCKER_CONFIG, and a guard that fails
the run when something is written to the user's real locations or the repository."""

import os
import subprocess
import sys
from pathlib import Path

from puller.credentials import config_path
from puller.store import default_store
from tests.support import isolation
from tests.support.paths import REPO


def test_each_test_has_its_own_home(tmp_path):
    for name in isolation.PER_USER_VARIABLES:
        assert Path(os.environ[name]).is_relative_to(tmp_path), name
    for name in isolation.UNSET_VARIABLES:
        assert name not in os.environ
    assert default_store().is_relative_to(tmp_path)
    assert config_path().is_relative_to(tmp_path)


def test_client_subprocess_uses_the_test_home(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from puller.store import default_store; print(default_store())"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).is_relative_to(tmp_path)


def test_snapshot_sees_writes_creations_and_removals(tmp_path):
    home, repo, docker = tmp_path / "h", tmp_path / "repo", tmp_path / "h" / ".docker"
    docker.mkdir(parents=True)
    (repo / ".venv").mkdir(parents=True)
    (docker / "config.json").write_text("{}")
    before = isolation.Snapshot.take([docker], home, repo)
    (docker / "config.json").write_text('{"auths": {}}')
    (home / ".kura").mkdir()
    (repo / "data").mkdir()
    (repo / ".venv" / "ignored").write_text("")
    changes = isolation.Snapshot.take([docker], home, repo).changes_since(before)
    assert changes == [f"created: {home / '.kura'}", f"created: {repo / 'data'}",
                       f"written: {docker / 'config.json'}"]
    (docker / "config.json").unlink()
    assert f"removed: {docker / 'config.json'}" in isolation.Snapshot.take([docker], home, repo).changes_since(before)


def _inner_session(**extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/support/leak_probe.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_guard_fails_a_run_that_writes_to_the_users_docker_config():
    clean = _inner_session()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    leaky = _inner_session(KURA_LEAK_TARGET=os.environ["DOCKER_CONFIG"])
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "1 passed" in leaky.stdout
    assert f"written: {Path(os.environ['DOCKER_CONFIG']) / 'leaked.json'}" in leaky.stdout
