"""The server's commands: `kura serve`, `kura fsck`, `kura user`, `kura du`, `kura repo`."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path

from .config import ConfigError, load


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kura")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the registry server")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow auth mode 'none' on an address other than loopback")

    check = commands.add_parser("fsck", help="verify a store: re-hash blobs, check every link")
    check.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    check.add_argument("--config", type=Path, help="read the storage root from this config")

    user = commands.add_parser("user", help="manage accounts in the htpasswd file (bcrypt)")
    user_commands = user.add_subparsers(dest="action", required=True)
    for action, text in (("add", "add a user or change their password (read from a prompt or stdin)"),
                         ("remove", "remove a user"), ("list", "list the user names")):
        sub = user_commands.add_parser(action, help=text)
        if action != "list":
            sub.add_argument("name")
        sub.add_argument("--file", type=Path, help="htpasswd file (default: auth.htpasswd, else <root>/auth/htpasswd)")
        sub.add_argument("--config", type=Path, help="server config naming the file")
        sub.add_argument("--root", type=Path, help="storage root (default ./data)")

    du = commands.add_parser("du", help="show what each repository stores and what a collection would free")
    du.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    du.add_argument("--config", type=Path, help="read the storage root and the quotas from this config")
    du.add_argument("--json", action="store_true", help="print the numbers (bytes) as JSON")

    repo = commands.add_parser("repo", help="manage repositories in the store")
    repo_commands = repo.add_subparsers(dest="action", required=True)
    delete = repo_commands.add_parser(
        "delete", help="delete a repository: its tags, manifests, referrers and blob links "
                       "(the blobs go at the next garbage collection)")
    delete.add_argument("name", help="the repository, e.g. team/app")
    delete.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    delete.add_argument("--config", type=Path, help="read the storage root and the quotas from this config")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    args = parser.parse_args(argv)
    try:
        config = load(args.config, root=args.root, **({"listen": args.listen} if args.command == "serve" else {}))
    except ConfigError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        if config.auth.mode == "none" and not _is_loopback(config.host) and not args.insecure_no_auth:
            print(f"kura: refusing to serve {config.listen} without authentication: anyone who can reach it "
                  "could push and delete. Set [auth] mode, or pass --insecure-no-auth.", file=sys.stderr)
            return 2
        return _serve(config)
    if args.command == "user":
        return _user(args, config)
    if args.command in ("du", "repo"):
        from .store_commands import delete_repository, disk_usage
        return disk_usage(config, args.json) if args.command == "du" else delete_repository(config, args.name, args.yes)
    return _fsck(config.root)


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _user(args, config) -> int:
    from .auth import htpasswd

    path = args.file or config.auth.htpasswd_path(config.root)
    try:
        if args.action == "list":
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
    except (htpasswd.HtpasswdError, OSError) as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if existed else 'added'} {args.name} in {path}")
    return 0


def _read_password() -> str:
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise _mismatch()
        return password
    return sys.stdin.readline().rstrip("\r\n")


def _mismatch():
    from .auth.htpasswd import HtpasswdError
    return HtpasswdError("the passwords do not match")


def _serve(config) -> int:
    from .app import make_app
    from .serve import run

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ssl_context = None
    if config.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    app = make_app(config)
    scheme = "https" if ssl_context else "http"
    logging.getLogger("kura.registry").info("serving %s on %s://%s (storage %s)",
                                            "registry", scheme, config.listen, config.root.resolve())
    run(app, config, ssl_context)
    return 0


def _fsck(root: Path) -> int:
    from storage.fsck import fsck

    report = fsck(root)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"checked {report.blobs} blobs, {report.repositories} repositories, "
          f"{report.manifests} manifests, {report.tags} tags: "
          + ("ok" if report.ok else f"{len(report.problems)} problem(s)"))
    return 0 if report.ok else 1
