"""Run a root container tool (podman, skopeo, dockerd, containerd) so that it writes nowhere
but a scratch folder, and looks up no names beyond this machine.

Their configuration moves almost everything (see mirror_clients.py), but some paths are built
in: the blob-info cache of podman and skopeo (/var/lib/containers/cache), dockerd's plugin
folder (/run/docker/plugins), the `opt` folder of the containerd that dockerd starts
(/opt/containerd). So each command runs in a mount namespace of its own where the system's
folders are overlays whose upper layer is in the scratch folder: the tool reads the real
/etc and /var/lib, and whatever it writes there lands in the scratch folder and is gone with
the namespace. Its /etc/resolv.conf names 127.0.0.1, so a fall-back to a public registry
(docker.io) fails at once on this machine instead of asking the nameserver."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

WRITABLE_SYSTEM_DIRS = ("/etc", "/opt", "/run", "/var/lib", "/var/cache", "/var/tmp")


def sandboxed(argv: list[str], scratch: Path) -> list[str]:
    """`argv` wrapped to run in a private mount namespace with its system writes under `scratch`."""
    scratch = scratch.resolve()
    if any(scratch.is_relative_to(d) for d in WRITABLE_SYSTEM_DIRS) or any(c in str(scratch) for c in ",:"):
        raise ValueError(f"{scratch}: the scratch folder must be outside {WRITABLE_SYSTEM_DIRS}, "
                         "and without ',' or ':' (overlay options)")
    # A layer set per command: two live overlays must not share an upper directory.
    scratch.mkdir(parents=True, exist_ok=True)
    layers = Path(tempfile.mkdtemp(prefix="overlay-", dir=scratch))
    steps = []
    for directory in WRITABLE_SYSTEM_DIRS:
        name = directory.strip("/").replace("/", "-")
        upper, work = layers / name / "upper", layers / name / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        options = f"lowerdir={directory},upperdir={upper},workdir={work}"
        steps.append(f"mount -t overlay overlay -o {shlex.quote(options)} {directory}")
    steps.append("rm -f /etc/resolv.conf && echo 'nameserver 127.0.0.1' > /etc/resolv.conf")
    steps.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-euc", " && ".join(steps), "sandboxed", *argv]
