"""`kura SUBCOMMAND ...`: server commands go to registry.cli, client commands to puller.cli,
container commands (and `inspect` of a container) to containers.cli.

Each side is imported lazily, so a client command never loads the server (and vice versa).
"""

from __future__ import annotations

import sys

SERVER_COMMANDS = ("serve", "fsck", "gc", "du", "repo", "user")
CLIENT_COMMANDS = ("pull", "images", "rmi", "unpack", "push", "login", "logout", "copy", "tag", "inspect", "tags",
                   "delete")
CONTAINER_COMMANDS = ("run", "ps", "logs", "stop", "rm", "diff")

USAGE = """usage: kura COMMAND [ARGS]     (kura help COMMAND, kura --version)

server commands:
  serve     run the registry (kura serve --help)
  fsck      verify a store: re-hash blobs, check every link
  gc        delete what no repository references (kura gc --dry-run)
  user      add or remove accounts (kura user add NAME)
  du        what each repository stores, what a collection would free, quota usage
  repo      delete a whole repository (kura repo delete NAME)

client commands:
  login     log in to a registry (kura login -u USER --password-stdin SERVER)
  logout    remove a stored login
  pull      pull an image into the local store (kura pull redis)
  push      push an image from the store or an OCI layout (kura push oci:DIR:TAG HOST/NAME:TAG)
  copy      copy between registries, OCI layouts and docker archives (mirroring)
  tag       give a stored image another reference
  inspect   show an image's digest, platforms, layers, entrypoint (--raw, --config, --json)
  tags      list a repository's tags
  delete    delete a manifest or tag in a registry
  images    list images in the local store
  rmi       remove an image from the local store
  unpack    unpack a stored image into an OCI runtime bundle (rootfs + config.json)

container commands (runc, no daemon):
  run       run a command in a new container (kura run --rm debian echo hello world)
  ps        list containers (-a: exited ones too)
  logs      a detached container's output (-f: follow)
  stop      stop a container: SIGTERM, then SIGKILL after -t seconds
  rm        remove a container and its writable layer
  diff      what a container changed in its filesystem (A/C/D)
  inspect   also shows a container (state, mounts, config) when given its name or id
"""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version
    try:
        return installed_version("kura")
    except PackageNotFoundError:
        return "unknown (not installed)"


def typos(a: str, b: str) -> int:
    """Edits from `a` to `b`: a letter added, dropped, changed, or two neighbours swapped."""
    previous2, previous = [], list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y)))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                row[j] = min(row[j], previous2[j - 2] + 1)
        previous2, previous = previous, row
    return previous[-1]


def suggestion(command: str) -> str | None:
    """The command `command` is a typo of: one edit away (two from six letters on). Further is
    more likely another tool's command (docker's exec, build) than a slip of ours."""
    allowed = 1 if len(command) < 6 else 2
    distance, best = min((typos(command, known), known)
                         for known in SERVER_COMMANDS + CLIENT_COMMANDS + CONTAINER_COMMANDS)
    return best if distance <= allowed else None


def _unknown(command: str) -> int:
    guess = suggestion(command)
    hint = f"; did you mean {guess!r}?" if guess else " (kura --help lists them)"
    print(f"kura: unknown command {command!r}{hint}", file=sys.stderr)
    return 2


def _names_container(argv: list[str]) -> bool:
    from containers.cli import find_container
    return find_container(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"], ["version"]):
        print(f"kura {version()}")
        return 0
    if argv[:1] == ["help"] and len(argv) > 1:
        argv = [*argv[1:], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] in SERVER_COMMANDS:
        from registry.cli import main as server_main
        return server_main(argv)
    if argv[0] in CONTAINER_COMMANDS or (argv[0] == "inspect" and _names_container(argv[1:])):
        from containers.cli import main as container_main
        return container_main(argv)
    if argv[0] in CLIENT_COMMANDS:
        from puller.cli import main as client_main
        return client_main(argv)
    return _unknown(argv[0])


if __name__ == "__main__":
    sys.exit(main())
