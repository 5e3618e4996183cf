"""The container commands: `kura run`, `ps`, `logs`, `stop`, `rm`, `diff`, and `inspect` of a
container (the dispatcher asks `find_container` first; an image is inspected otherwise)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kura.arguments import Parser

COMMANDS = ("run", "ps", "logs", "stop", "rm", "diff")
RUN_ERROR = 125
"""`kura run`'s own failures (as docker's): any other exit code is the container's."""


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None,
                        help="local image store, containers under its containers/ (default $XDG_DATA_HOME/kura/store)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kura")
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    r = commands.add_parser(
        "run", help="run a command in a new container", formatter_class=raw, add_help=False,
        description="Examples: kura run --rm debian echo hello world\n"
                    "          kura run -d --name cache redis redis-server --port 6380\n\n"
                    "The image is pulled if the store lacks it. Its layers are unpacked once into a\n"
                    "read-only directory shared by all its containers; each container writes to its own\n"
                    "overlay upper directory. The network is the host's (no port mapping) unless\n"
                    "--network none. Exit code: the container's, or 125 when kura itself failed.")
    r.add_argument("image")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ARGS", help="replaces the image's Cmd")
    r.add_argument("--name", help="a name for the container (default: its short id)")
    r.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    r.add_argument("--rm", action="store_true", help="remove the container when it exits")
    r.add_argument("-i", "--interactive", action="store_true", help="pass stdin to the container")
    r.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (K alone: its value here)")
    r.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    r.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]",
                   help="bind-mount a host file or directory")
    r.add_argument("-u", "--user", metavar="USER", help="NAME|UID[:GROUP|GID], resolved in the image")
    r.add_argument("-h", "--hostname", help="the container's hostname (default: its short id)")
    r.add_argument("--help", action="help", help="show this help message and exit")
    r.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (\"\" clears it)")
    r.add_argument("--network", choices=("host", "none"), default="host",
                   help="host (default): the host's network; none: loopback only")
    r.add_argument("-q", "--quiet", action="store_true", help="no pull progress")
    _store_argument(r)

    p = commands.add_parser("ps", help="list containers", description="Example: kura ps -a")
    p.add_argument("-a", "--all", action="store_true", help="exited ones too")
    p.add_argument("-q", "--quiet", action="store_true", help="ids only")
    _store_argument(p)

    lg = commands.add_parser("logs", help="show a detached container's output",
                             description="Example: kura logs -f cache")
    lg.add_argument("container", metavar="NAME")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the container exits")
    _store_argument(lg)

    s = commands.add_parser("stop", help="stop a container (SIGTERM, then SIGKILL)",
                            description="Example: kura stop -t 5 cache")
    s.add_argument("containers", nargs="+", metavar="NAME")
    s.add_argument("-t", "--time", type=float, default=10, metavar="SECONDS",
                   help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    _store_argument(s)

    rm = commands.add_parser("rm", help="remove a container: its state and writable layer",
                             description="Example: kura rm cache   (kura rm -f cache: stop it first)")
    rm.add_argument("containers", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    _store_argument(rm)

    df = commands.add_parser("diff", help="what a container changed: A added, C changed, D deleted",
                             description="Example: kura diff d1")
    df.add_argument("container", metavar="NAME")
    _store_argument(df)

    ins = commands.add_parser("inspect", help="a container's state, mounts and config as JSON",
                              description="Example: kura inspect cache")
    ins.add_argument("container", metavar="NAME")
    _store_argument(ins)
    parser.commands = commands.choices
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import signal

    from puller.errors import printable
    # A plain `kill` unwinds like Ctrl-C: a half-made container is removed, its mount undone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return HANDLERS[args.command](args)
    except (ValueError, OSError, KeyError) as exc:
        text = f"malformed image data: missing {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"kura: {printable(text)}", file=sys.stderr)
        return RUN_ERROR if args.command == "run" else 1
    except KeyboardInterrupt:
        print("kura: interrupted", file=sys.stderr)
        return 130


def _store_root(args) -> Path:
    from puller.store import default_store
    return Path(args.store or default_store())


def _containers(args):
    from .state import Containers
    return Containers(_store_root(args))


def find_container(argv: list[str]) -> bool:
    """Whether `kura inspect ARGS` names a container (else it is about an image)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("name", nargs="?")
    probe.add_argument("--store", type=Path)
    known, _ = probe.parse_known_args(argv)
    if not known.name:
        return False
    from .state import ContainerError, Containers
    containers = Containers(_store_root(known))
    if not containers.root.is_dir():
        return False
    try:
        containers.find(known.name)
    except ContainerError:
        return False
    return True


# -- run --------------------------------------------------------------------------------
def _run(args) -> int:
    from puller.store import Store

    from .spec import RunOptions
    if args.detach and args.interactive:
        raise ValueError("-d and -i do not go together: a detached container has no stdin")
    options = RunOptions(command=tuple(args.cmd), entrypoint=args.entrypoint, env=tuple(args.env),
                         workdir=args.workdir, user=args.user, hostname=args.hostname,
                         volumes=tuple(args.volume), network=args.network, interactive=args.interactive)
    store = Store(_store_root(args))
    reference, digest = _image(store, args.image, args.quiet)
    from .runtime import runc
    runc()  # before anything is made: say so when it is missing
    containers = _containers(args)
    from .state import now
    record = containers.create({"name": args.name, "image": reference, "image_digest": str(digest),
                                "status": "created", "created": now(), "auto_remove": args.rm})
    try:
        _prepare(store, containers, record, options)
    except BaseException:
        from .runtime import remove
        remove(containers, containers.read(record["id"]))
        raise
    return _start(containers, record["id"], args)


def _image(store, text: str, quiet: bool):
    """The stored image `text` names (pulled first if the store lacks it): (reference, digest)."""
    from ocispec.digest import Digest
    from ocispec.reference import Reference
    reference = Reference.parse(text)
    image = store.find(str(reference))
    if image is not None:
        return str(reference), Digest.parse(image.descriptor["digest"])
    import asyncio

    from puller import credentials as creds
    from puller.platform import Platform
    from puller.progress import for_terminal
    from puller.pull import PullOptions, pull
    from puller.registries import Registries
    if not quiet:
        print(f"kura: {reference} is not in the store; pulling it", file=sys.stderr)
    result = asyncio.run(pull(reference, store, Registries.load(), creds.lookup,
                              PullOptions(platform=Platform.host(), progress=for_terminal(quiet))))
    return str(reference), result.digest


def _prepare(store, containers, record: dict, options) -> None:
    """Hold the image, make the root filesystem, write config.json."""
    import json

    from ocispec.digest import Digest
    from puller.bundle import read_image_config

    from .lowers import ensure_lower, prune
    from .rootfs import copy_lower, mount_overlay, mountpoints
    from .spec import runtime_spec
    cid = record["id"]
    digest = Digest.parse(record["image_digest"])
    store.hold(cid, str(digest), record["name"])
    _, config = read_image_config(store, digest)
    prune(store, containers.lowers)
    lower = ensure_lower(store, containers.lowers, digest)
    directory = containers.directory(cid)
    rootfs, upper, work, init = (directory / name for name in ("rootfs", "upper", "work", "init"))
    # The user and groups are resolved in the image's files: the lower directory's, as the
    # container starts with them.
    spec = runtime_spec(config, lower, options, cid[:12])
    spec["root"]["path"] = str(rootfs)
    layers = [init, lower] if mountpoints(lower, init, spec["mounts"]) else [lower]
    why = mount_overlay(layers, upper, work, rootfs)
    if why is None:
        mode = "overlay"
    else:
        print(f"kura: {why}; the container gets a private copy of the image's files instead", file=sys.stderr)
        rootfs.mkdir(exist_ok=True)
        copy_lower(lower, rootfs)
        mode = "copy"
    (directory / "config.json").write_text(json.dumps(spec, indent=2))
    mounts = [{"type": "overlay", "destination": "/", "source": str(rootfs), "lower": str(lower),
               "upper": str(upper), "work": str(work)} if mode == "overlay" else
              {"type": "copy", "destination": "/", "source": str(rootfs), "lower": str(lower)}]
    mounts += [{"type": "bind", "destination": m["destination"], "source": m.get("source"),
                "options": m.get("options", [])} for m in spec.get("mounts", []) if m.get("type") == "bind"]
    containers.update(cid, rootfs_mode=mode, lower=str(lower), mounts=mounts,
                      command=spec["process"]["args"])


def _start(containers, cid: str, args) -> int:
    import os
    import subprocess
    import time

    from .runtime import supervise
    if not args.detach:
        stdin = None if args.interactive else subprocess.DEVNULL
        return supervise(containers, cid, stdin=stdin, forward_signals=True)
    directory = containers.directory(cid)
    project = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")])))
    with open(directory / "log", "ab") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "containers.supervise", str(containers.root.parent), cid],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
                         start_new_session=True)
    while containers.read(cid).get("status") == "created":  # until runc has started it (or failed to)
        if supervisor.poll() is not None and containers.read(cid).get("status") == "created":
            raise OSError(f"the container's supervisor failed (exit code {supervisor.returncode}); "
                          f"see {directory / 'log'}")
        time.sleep(0.01)
    print(cid)
    return 0


# -- ps ---------------------------------------------------------------------------------
def _ps(args) -> int:
    from puller.errors import printable

    from .runtime import current
    from .state import now
    containers = _containers(args)
    records = [current(containers, r) for r in containers.all()]
    records = [r for r in records if args.all or r["status"] == "running"]
    records.sort(key=lambda r: r.get("created", 0), reverse=True)
    if args.quiet:
        for r in records:
            print(r["id"][:12])
        return 0
    t = now()
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for r in records:
        command = " ".join(r.get("command") or [])
        command = f'"{command[:20]}…"' if len(command) > 21 else f'"{command}"'
        rows.append((r["id"][:12], printable(_short_image(r["image"])), printable(command),
                     ago(t - r.get("created", t)) + " ago", status_text(r, t), r["name"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:  # columns as docker's: three spaces apart
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[-1])
    return 0


def _short_image(reference: str) -> str:
    return reference.removeprefix("docker.io/library/").removeprefix("docker.io/")


def ago(seconds: float) -> str:
    """As docker says durations: "5 seconds", "About a minute", "3 hours"."""
    seconds = max(0, int(seconds))
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = seconds // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = minutes // 60
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"


def status_text(record: dict, t: float) -> str:
    if record["status"] == "running":
        return f"Up {ago(t - record.get('started', t))}"
    if record["status"] == "created":
        return "Created"
    code = record.get("exit_code")
    finished = record.get("finished")
    when = f" {ago(t - finished)} ago" if finished is not None else ""
    return f"Exited ({'?' if code is None else code}){when}"


# -- logs, stop, rm, diff, inspect ----------------------------------------------------------
def _logs(args) -> int:
    import time

    from .runtime import current
    containers = _containers(args)
    record = containers.find(args.container)
    path = containers.directory(record["id"]) / "log"
    if not path.exists():
        print(f"kura: {record['name']} ran in the foreground: its output went to the terminal, no log was kept",
              file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            if not args.follow or current(containers, containers.read(record["id"]))["status"] != "running":
                if args.follow:  # what was written between the last read and the exit
                    out.write(f.read())
                    out.flush()
                return 0
            time.sleep(0.2)


def _each(names: list[str], act) -> int:
    """`act(name)` for each name, printing it when done; a failure is one line, the others
    go on (as docker stop and docker rm do). The exit status: 1 if any failed."""
    failed = 0
    for name in names:
        try:
            act(name)
            print(name)
        except ValueError as exc:
            print(f"kura: {exc}", file=sys.stderr)
            failed = 1
    return failed


def _stop(args) -> int:
    from .runtime import stop
    containers = _containers(args)
    return _each(args.containers, lambda name: stop(containers, containers.find(name), args.time))


def _rm(args) -> int:
    from .runtime import current, remove, runc_kill, stop
    containers = _containers(args)

    def rm(name: str) -> None:
        record = current(containers, containers.find(name))
        if record["status"] == "running":
            if not args.force:
                raise ValueError(f"container {name} is running: kura stop {name} first, or kura rm -f {name}")
            runc_kill(containers, record["id"], "KILL")
            stop(containers, record, 10)
        remove(containers, containers.read(record["id"]))

    return _each(args.containers, rm)


def _diff(args) -> int:
    from puller.errors import printable
    from .diff import changes
    containers = _containers(args)
    record = containers.find(args.container)
    if record.get("rootfs_mode") != "overlay":
        raise ValueError(f"container {args.container} runs on a private copy of the image, not an overlay: "
                         f"there is no upper directory to compare")
    directory = containers.directory(record["id"])
    for kind, path in changes(directory / "upper", Path(record["lower"])):
        print(f"{kind} {printable(path)}")  # names the container chose: no terminal escapes
    return 0


def _inspect(args) -> int:
    import json
    from datetime import datetime, timezone

    from .runtime import current
    containers = _containers(args)
    record = current(containers, containers.find(args.container))

    def iso(t):
        return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z") if t else None
    directory = containers.directory(record["id"])
    try:
        spec = json.loads((directory / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        spec = {}
    process = spec.get("process", {})
    running = record["status"] == "running"
    print(json.dumps({
        "id": record["id"], "name": record["name"], "image": record["image"], "image_digest": record["image_digest"],
        "created": iso(record.get("created")),
        "state": {"status": record["status"], "running": running, "pid": record.get("pid") if running else None,
                  "exit_code": record.get("exit_code"), "started_at": iso(record.get("started")),
                  "finished_at": iso(record.get("finished"))},
        "rootfs": record.get("rootfs_mode"), "mounts": record.get("mounts", []),
        "config": {"args": process.get("args"), "env": process.get("env"), "cwd": process.get("cwd"),
                   "user": process.get("user"), "hostname": spec.get("hostname"),
                   "network": "none" if any(n.get("type") == "network" for n in
                                            spec.get("linux", {}).get("namespaces", [])) else "host",
                   "auto_remove": record.get("auto_remove", False)},
        "log_path": str(directory / "log") if (directory / "log").exists() else None,
    }, indent=2))
    return 0


HANDLERS = {"run": _run, "ps": _ps, "logs": _logs, "stop": _stop, "rm": _rm, "diff": _diff, "inspect": _inspect}
