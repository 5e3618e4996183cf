"""The server's commands: `kura serve`, `kura fsck`, `kura gc`, `kura user`, `kura du`, `kura repo`."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from kura.arguments import Parser

from .config import ConfigError, load


SERVE_HELP = """Run the registry server. Flags override the config file, which overrides the defaults.
It refuses to start (one line naming the path or address) when it cannot listen, read
its TLS files, or create or write its storage root.

Workers: by default one server process per CPU core answers on the address (--workers,
[server] workers; the kernel spreads connections over them). A supervisor process restarts
a worker that dies. SIGHUP to it reloads: the config file is read again, new workers start
beside the old ones, which finish their requests in progress and exit; no connection is
refused meanwhile, and a config that is wrong is logged and the old workers go on.
With --workers 1 there is one process and no supervisor (SIGHUP then stops it).

Examples:
  kura serve
  kura serve --config kura.toml
  kura serve --listen 127.0.0.1:5001 --root ./other-data
  kura serve --config kura.toml --workers 4
  kill -HUP <pid of kura serve>      (reload the config, with more than one worker)
"""

FSCK_HELP = """Verify a store: re-hash every blob, check every link, re-validate every manifest.
Prints each problem; exits 1 when there is any. Safe while the server runs.

Examples:
  kura fsck --root /srv/kura
  kura fsck --config kura.toml
"""

USER_HELP = """Manage the accounts of htpasswd and token auth (bcrypt, `htpasswd -B` compatible).
The file is auth.htpasswd from the config, else <storage root>/auth/htpasswd: give the same
--config (or --root) as `kura serve`. The server re-reads it; no restart needed.

Examples:
  kura user add alice --config kura.toml
  kura user list --config kura.toml
  kura user remove alice --config kura.toml
"""

USER_ACTIONS = {
    "add": ("add a user or change their password",
            "Add a user, or change their password. The password is read from a prompt (twice),\n"
            "or from the first line of stdin. At least auth.min_password_length characters.\n\n"
            "Examples:\n  kura user add alice --config kura.toml\n"
            "  echo \"$PASSWORD\" | kura user add alice --config kura.toml\n"),
    "remove": ("remove a user", "Remove a user.\n\nExample:\n  kura user remove alice --config kura.toml\n"),
    "list": ("list the user names", "List the user names, one a line.\n\nExample:\n  kura user list --config kura.toml\n"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser, and each (sub)command's own parser by its words (to report errors as it)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="kura")
    commands = parser.add_subparsers(dest="command", required=True)
    own: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    serve = own["serve",] = commands.add_parser("serve", help="run the registry server", description=SERVE_HELP,
                                                 formatter_class=raw)
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="server processes on the address (default: [server] workers, else one per CPU core)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow auth mode 'none' on an address other than loopback")

    check = own["fsck",] = commands.add_parser("fsck", help="verify a store: re-hash blobs, check every link",
                                                description=FSCK_HELP, formatter_class=raw)
    check.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    check.add_argument("--config", type=Path, help="read the storage root from this config")

    collect = own["gc",] = commands.add_parser(
        "gc", help="delete what no repository references any more (safe while kura serve runs on the same store)",
        description="One garbage collection now, safe while kura serve runs on the same store: blobs no\n"
                    "manifest references, unneeded blob links, expired uploads, stale temp files and empty\n"
                    "repositories (after the [gc] retention and untagged rules).\n\n"
                    "Examples:\n  kura gc --config kura.toml --dry-run\n  kura gc --root /srv/kura --json\n",
        formatter_class=raw)
    collect.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    collect.add_argument("--config", type=Path, help="server config: storage root and [gc] settings")
    collect.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    collect.add_argument("--json", action="store_true", help="print the report as JSON")

    user = own["user",] = commands.add_parser("user", help="manage accounts in the htpasswd file (bcrypt)",
                                               description=USER_HELP, formatter_class=raw)
    user_commands = user.add_subparsers(dest="action", required=True)
    for action, (text, description) in USER_ACTIONS.items():
        sub = own["user", action] = user_commands.add_parser(action, help=text, description=description,
                                                             formatter_class=raw)
        if action != "list":
            sub.add_argument("name")
        sub.add_argument("--file", type=Path, help="htpasswd file (default: auth.htpasswd, else <root>/auth/htpasswd)")
        sub.add_argument("--config", type=Path, help="server config naming the file")
        sub.add_argument("--root", type=Path, help="storage root (default ./data)")

    du = own["du",] = commands.add_parser(
        "du", help="show what each repository stores and what a collection would free",
        description="Per repository: manifests, tags, bytes referenced, bytes only it holds; totals\n"
                    "(store size, reclaimable by the next collection) and each quota's usage.\n\n"
                    "Examples:\n  kura du --config kura.toml\n  kura du --root /srv/kura --json\n",
        formatter_class=raw)
    du.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    du.add_argument("--config", type=Path, help="read the storage root and the quotas from this config")
    du.add_argument("--json", action="store_true", help="print the numbers (bytes) as JSON")

    repo = own["repo",] = commands.add_parser("repo", help="manage repositories in the store",
                                               description="Example:\n  kura repo delete team/app --config kura.toml\n",
                                               formatter_class=raw)
    repo_commands = repo.add_subparsers(dest="action", required=True)
    delete = own["repo", "delete"] = repo_commands.add_parser(
        "delete", help="delete a repository: its tags, manifests, referrers and blob links "
                       "(the blobs go at the next garbage collection)",
        description="Delete a repository at once: its tags, manifests, referrers and blob links, in an order\n"
                    "that keeps the store consistent. The blobs go at the next garbage collection.\n\n"
                    "Example:\n  kura repo delete team/app --config kura.toml --yes\n",
        formatter_class=raw)
    delete.add_argument("name", help="the repository, e.g. team/app")
    delete.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    delete.add_argument("--config", type=Path, help="read the storage root and the quotas from this config")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return parser, own


def main(argv: list[str]) -> int:
    from kura.prompt import Interrupted
    try:
        return _run(argv)
    except Interrupted:  # Ctrl-C at a prompt: the line is ended, nothing more to say
        return 130
    except KeyboardInterrupt:
        print("kura: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    parser, own = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's own parser: `usage: kura serve ...`, not the top level's.
        words = (args.command, getattr(args, "action", None))
        own.get(words, own[args.command,]).error(f"unrecognized arguments: {' '.join(unknown)}")
    flags = {"listen": args.listen, "workers": args.workers} if args.command == "serve" else {}

    def read_config():
        return load(args.config, root=args.root, **flags)

    try:
        config = read_config()
    except ConfigError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from .startup import is_loopback

        if config.auth.mode == "none" and not is_loopback(config.host) and not args.insecure_no_auth:
            print(f"kura: refusing to serve {config.listen} without authentication: anyone who can reach it "
                  "could push and delete. Set [auth] mode, or pass --insecure-no-auth.", file=sys.stderr)
            return 2
        return _serve(config, read_config)
    if args.command == "user":
        return _user(args, config)
    if args.command == "gc":
        return _gc(config, dry_run=args.dry_run, as_json=args.json)
    if args.command in ("du", "repo"):
        from .store_commands import delete_repository, disk_usage
        return disk_usage(config, args.json) if args.command == "du" else delete_repository(config, args.name, args.yes)
    return _fsck(config)


def _user(args, config) -> int:
    from kura.prompt import NoAnswer

    from .auth import htpasswd

    path = args.file or config.auth.htpasswd_path(config.root)
    try:
        if args.action == "list":
            if not path.exists():
                raise htpasswd.HtpasswdError(f"{path} does not exist (kura user add creates it)")
            for name in htpasswd.list_users(path):
                print(name)
            return 0
        if args.action == "remove":
            if not htpasswd.remove_user(path, args.name):
                print(f"kura: no user {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"removed {args.name} from {path}")
            return 0
        if not htpasswd.valid_user_name(args.name):
            raise htpasswd.HtpasswdError(f"invalid user name {args.name!r}")
        password = _read_password()
        if len(password) < config.auth.min_password_length:
            raise htpasswd.HtpasswdError(f"the password must have at least {config.auth.min_password_length} "
                                         "characters (auth.min_password_length)")
        existed = htpasswd.set_user(path, args.name, password)
    except (htpasswd.HtpasswdError, NoAnswer, OSError) as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if existed else 'added'} {args.name} in {path}")
    return 0


def _read_password() -> str:
    from kura.prompt import ask

    if sys.stdin.isatty():
        password = ask("Password: ", "password", secret=True)
        if ask("Repeat password: ", "password", secret=True) != password:
            raise _mismatch()
        return password
    return sys.stdin.readline().rstrip("\r\n")


def _mismatch():
    from .auth.htpasswd import HtpasswdError
    return HtpasswdError("the passwords do not match")


def _serve(config, read_config) -> int:
    """One process (--workers 1), or workers under a supervisor that reloads on SIGHUP
    (`read_config` reads the config file again, with the same flags)."""
    from .monitoring import workers
    from .serve import run
    from .startup import StartupError, prepare
    from .logformat import configure
    from .supervisor import supervise, worker_count

    configure(config.log_level, config.log_format)
    try:
        if worker_count(config) > 1:
            forking = functools.partial(prepare, forks_workers=True)
            with workers.shared_directory():  # before the app loads prometheus_client
                return supervise(config, forking(config), read_config, forking)
        workers.single_process()
        ready = prepare(config)
        run(ready.app, config, ready.ssl_context, ready.notes)
    except StartupError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1
    return 0


def _fsck(config) -> int:
    import asyncio
    import contextlib

    from storage import StorageError
    from storage.fsck import Report, fsck
    from .store_commands import CommandError, _closing, open_command_store

    try:
        driver = open_command_store(config)
    except CommandError as exc:
        report = Report(problems=[str(exc)])
    else:
        # Not asyncio.run: on Ctrl-C it only cancels the task, and a read that blocks the
        # loop (a blob on a stuck disk, a FIFO) would keep it waiting. Here KeyboardInterrupt
        # ends the check wherever it is.
        loop = asyncio.new_event_loop()
        task = loop.create_task(_closing(fsck(driver)))
        try:
            report = loop.run_until_complete(task)
        except KeyboardInterrupt:
            if task.done():  # it was raised in the task: the one report of it is main()'s line
                task.exception()
            else:  # it came while the task waited: let the task end before the loop closes
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
            raise
        except (StorageError, OSError) as exc:
            print(f"kura: fsck failed: {exc}", file=sys.stderr)
            return 1
        finally:
            loop.close()
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"checked {report.blobs} blobs, {report.repositories} repositories, "
          f"{report.manifests} manifests, {report.tags} tags: "
          + ("ok" if report.ok else f"{len(report.problems)} problem(s)"))
    return 0 if report.ok else 1


def _gc(config, *, dry_run: bool, as_json: bool) -> int:
    import asyncio
    import json

    from storage import StorageError
    from .quota import collect_garbage
    from .store_commands import CommandError, _closing, open_command_store

    try:
        driver = open_command_store(config)
    except CommandError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1
    try:
        report = asyncio.run(_closing(collect_garbage(driver, config, dry_run=dry_run)))
    except (StorageError, OSError) as exc:
        print(f"kura: garbage collection failed: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    if report.skipped:
        print("another garbage collection is running on this store; nothing done")
        return 0
    verb = "would remove" if dry_run else "removed"
    for name, tag in report.tags:
        print(f"{verb} tag {name}:{tag}")
    for name, digest in report.manifests:
        print(f"{verb} manifest {name}@{digest}")
    for name, digest in report.layer_links:
        print(f"{verb} blob link {name} -> {digest}")
    for digest, size in report.blobs:
        print(f"{verb} blob {digest} ({size} bytes)")
    for name in report.repositories:
        print(f"{verb} empty repository {name}")
    if report.uploads or report.temp_files:
        print(f"{verb} {report.uploads} expired upload session(s), {report.temp_files} stale temp file(s)")
    print(f"{'would free' if dry_run else 'freed'} {_size(report.bytes_freed)}: {len(report.blobs)} blob(s), "
          f"{len(report.layer_links)} blob link(s), {len(report.manifests)} manifest(s), {len(report.tags)} tag(s), "
          f"{len(report.repositories)} empty repositories, in {report.duration:.1f} s")
    return 0


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.1f} {unit} ({count} bytes)"
