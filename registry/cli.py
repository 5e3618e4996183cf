"""The server's commands: `kura serve`, `kura fsck`, `kura gc` and `kura user`."""

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

    collect = commands.add_parser("gc", help="delete what no repository references any more (safe while "
                                  "kura serve runs on the same store)")
    collect.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    collect.add_argument("--config", type=Path, help="server config: storage root and [gc] settings")
    collect.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    collect.add_argument("--json", action="store_true", help="print the report as JSON")

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
    if args.command == "gc":
        return _gc(config, dry_run=args.dry_run, as_json=args.json)
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


def _gc(config, *, dry_run: bool, as_json: bool) -> int:
    import asyncio
    import json

    from storage import FilesystemDriver, StorageError
    from storage.gc import collect

    if not (config.root / "blobs").is_dir():
        print(f"kura: {config.root} is not a Kura store (no blobs/ directory)", file=sys.stderr)
        return 1
    try:
        report = asyncio.run(collect(FilesystemDriver(config.root), config.gc_settings(), dry_run=dry_run))
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
