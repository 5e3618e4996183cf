"""Whether the container tests can run real runc here, and the one way they skip when not."""

from __future__ import annotations

import os
import shutil

import pytest


def runc_unusable() -> str | None:
    if shutil.which("runc") is None:
        return "runc is not installed (make test installs it)"
    if os.geteuid() != 0:
        return "runc containers need root here"
    return None


def skip_without_runc() -> None:
    """Skip, saying why in the output, where runc cannot run containers."""
    reason = runc_unusable()
    if reason:
        print(f"skipping the container tests: {reason}")
        pytest.skip(reason)
