"""The server's commands: `kura serve` and `kura fsck`."""

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

    check = commands.add_parser("fsck", help="verify a store: re-hash blobs, check every link")
    check.add_argument("--root", type=Path, help="storage root directory (default ./data)")
    check.add_argument("--config", type=Path, help="read the storage root from this config")

    args = parser.parse_args(argv)
    try:
        config = load(args.config, root=args.root, **({"listen": args.listen} if args.command == "serve" else {}))
    except ConfigError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(config)
    return _fsck(config.root)


def _serve(config) -> int:
    from aiohttp import web

    from .app import make_app

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ssl_context = None
    if config.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    app = make_app(config)
    scheme = "https" if ssl_context else "http"
    logging.getLogger("kura.registry").info("serving %s on %s://%s (storage %s)",
                                            "registry", scheme, config.listen, config.root.resolve())
    web.run_app(app, host=config.host, port=config.port, ssl_context=ssl_context,
                access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
                print=None)
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
