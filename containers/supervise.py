"""`python -m containers.supervise STORE ID`: the per-container process of a detached `kura run`
(started in a session of its own, stdout/stderr on the container's log). It runs the container
with runc and records its end; nothing else stays behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .runtime import supervise
from .state import Containers


def main(argv: list[str]) -> int:
    store, cid = argv
    containers = Containers(Path(store))
    with open(os.devnull, "rb") as devnull:
        return supervise(containers, cid, stdin=devnull, stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
