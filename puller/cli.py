"""The client's commands: `kura pull`, `kura images`, `kura rmi`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kura.arguments import Parser

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from ocispec.digest import Digest
    from ocispec.reference import Reference

    from .platform import Platform
    from .store import Store

# Nothing else at the top: `kura pull --help` (and a usage error) must not pay for the HTTP
# stack, tarfile or the store. Each command imports what it uses; tests/test_cli_imports.py
# pins that.


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None,
                        help="local image store (default $XDG_DATA_HOME/kura/store)")


def _unpack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-devices", action="store_true", help="create device nodes (root only)")
    parser.add_argument("--max-layer-bytes", type=int, default=16 << 30,
                        help="refuse a layer that decompresses to more (default 16 GiB)")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1 (not {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kura")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pull", help="pull an image into the local store",
                            description="Pull an image, verifying every byte. Example: kura pull redis:7",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="e.g. redis, user/app:1.0, localhost:5000/x@sha256:...")
    p.add_argument("--platform", help="os/arch[/variant] to pick from an index (default: this machine)")
    p.add_argument("--all-platforms", action="store_true", help="store every platform of an index")
    p.add_argument("--jobs", type=_at_least_one, default=4, help="blobs downloaded at once (default 4)")
    p.add_argument("--registries-conf", type=Path, help="containers-registries.conf(5) file")
    p.add_argument("--output", help="also write the image to oci:DIR[:TAG] or docker-archive:FILE.tar")
    p.add_argument("--unpack", type=Path, metavar="BUNDLE_DIR", help="also unpack it into an OCI runtime bundle")
    _unpack_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--verbose", "-v", action="store_true", help="show registry rate limits and requests")
    _store_argument(p)

    u = commands.add_parser("unpack", help="unpack a stored image into an OCI runtime bundle",
                            description="Example: kura unpack redis ./redis-bundle && runc run -b ./redis-bundle r1")
    u.add_argument("reference")
    u.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    _unpack_arguments(u)
    _store_argument(u)

    ps = commands.add_parser("push", help="push an image to a registry",
                             description="Examples: kura push oci:./layout:7 localhost:5000/redis:7\n"
                                         "          kura push localhost:5000/redis:7   (from the local store)",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("source", help="oci:DIR[:TAG], oci-archive:FILE.tar[:TAG], docker-archive:FILE.tar[:REF], "
                                   "or a reference in the local store")
    ps.add_argument("destination", nargs="?", help="where to push (default: the source reference)")
    ps.add_argument("--mount-from", help="repository of the same registry to mount blobs from")
    ps.add_argument("--jobs", type=_at_least_one, default=4, help="blobs uploaded at once (default 4)")
    ps.add_argument("--registries-conf", type=Path, help="containers-registries.conf(5) file")
    ps.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    ps.add_argument("--verbose", "-v", action="store_true", help="say what is retried and why")
    _store_argument(ps)

    li = commands.add_parser("login", help="log in to a registry (stored in Docker's config.json)",
                             description="Example: echo \"$PASSWORD\" | kura login -u alice --password-stdin localhost:5000")
    li.add_argument("server", nargs="?", help="registry host[:port] (default docker.io)")
    li.add_argument("-u", "--username")
    li.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    li.add_argument("-p", "--password", help=argparse.SUPPRESS)
    lo = commands.add_parser("logout", help="remove a stored login", description="Example: kura logout localhost:5000")
    lo.add_argument("server", nargs="?", help="registry host[:port] (default docker.io)")

    cp = commands.add_parser("copy", help="copy an image between registries and layouts",
                             description="Example: kura copy docker.io/library/redis:latest localhost:5000/redis:latest\n"
                                         "SRC: a registry reference, oci:DIR[:TAG], oci-archive:FILE.tar[:TAG] or "
                                         "docker-archive:FILE.tar[:REF];\nDEST: a registry reference, "
                                         "oci:DIR[:TAG] or docker-archive:FILE.tar",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.add_argument("--all-platforms", action="store_true", help="copy every platform of an index")
    cp.add_argument("--platform", help="os/arch[/variant] to pick from an index (default: this machine)")
    cp.add_argument("--registries-conf", type=Path, help="containers-registries.conf(5) file")
    cp.add_argument("--quiet", "-q", action="store_true")
    cp.add_argument("--verbose", "-v", action="store_true", help="say what is retried and why")

    tg = commands.add_parser("tag", help="give a stored image another reference", description="Example: kura tag redis myredis:7")
    tg.add_argument("source")
    tg.add_argument("target")
    _store_argument(tg)

    ins = commands.add_parser(
        "inspect", help="show an image: digest, platforms, config, layers",
        description="Examples: kura inspect localhost:5000/redis:7 --json\n"
                    "          kura inspect redis --platform linux/arm64\n\n"
                    "Where it looks: a reference that names a registry host (localhost:5000/redis,\n"
                    "docker.io/library/redis) is asked from that registry, never a local copy that may\n"
                    "be stale; a short name (redis, me/app:1) is read from the local store when it is\n"
                    "there, else from Docker Hub; --local reads only the store. The Source line (the\n"
                    "\"source\" key with --json) says which it was.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("reference")
    ins.add_argument("--local", action="store_true", help="read the local store only, never a registry")
    ins.add_argument("--platform", help="os/arch[/variant]: for an index, show that platform's image "
                                        "(default: the index and its platforms)")
    ins.add_argument("--raw", action="store_true", help="print the manifest exactly as stored")
    ins.add_argument("--config", action="store_true", help="print the image config")
    ins.add_argument("--json", action="store_true", help="machine-readable output (sizes in bytes)")
    ins.add_argument("--registries-conf", type=Path)
    _store_argument(ins)

    ts = commands.add_parser("tags", help="list a repository's tags", description="Example: kura tags localhost:5000/redis")
    ts.add_argument("reference")
    ts.add_argument("--json", action="store_true")
    ts.add_argument("--registries-conf", type=Path)

    de = commands.add_parser(
        "delete", help="delete a tag, or a manifest by digest, in a registry",
        description="Examples: kura delete localhost:5000/redis:old\n"
                    "          kura delete localhost:5000/redis@sha256:...\n\n"
                    "A tag is deleted by itself where the registry can do that (Kura can). Where it\n"
                    "cannot (the reference registry, docker-registry), deleting the tag means deleting\n"
                    "its manifest, and with it every tag that points at it: kura asks first at a\n"
                    "terminal, and elsewhere does it only with --yes.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    de.add_argument("reference")
    de.add_argument("--yes", "-y", action="store_true",
                    help="delete the manifest without asking when the registry cannot delete just the tag")
    de.add_argument("--registries-conf", type=Path)

    i = commands.add_parser("images", help="list images in the local store", description="Example: kura images")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    _store_argument(i)

    r = commands.add_parser("rmi", help="remove an image and the blobs nothing else uses",
                            description="Example: kura rmi redis")
    r.add_argument("reference")
    _store_argument(r)
    parser.commands = commands.choices  # main() reports argument errors in the subcommand's name
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    import signal

    from kura.prompt import Interrupted

    from .errors import printable
    # A plain `kill` must unwind like Ctrl-C does, so temp files and scratch stores go away.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command in WITHOUT_STORE:
            return WITHOUT_STORE[args.command](args)
        from .store import Store, default_store
        return WITH_STORE[args.command](args, Store(args.store or default_store()))
    except _reported() as exc:
        text = f"malformed image data: missing {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"kura: {printable(text)}", file=sys.stderr)
        return 1
    except RecursionError:
        # Only hostile input nests this deep (JSON documents, links in archives).
        print("kura: malformed image data: nested too deeply to read", file=sys.stderr)
        return 1
    except Interrupted:  # Ctrl-C at a prompt: the line is ended, nothing more to say
        return 130
    except KeyboardInterrupt:
        print("kura: interrupted", file=sys.stderr)
        return 130


def _reported() -> tuple[type[BaseException], ...]:
    """What main() reports in one line. The client's own errors (InvalidReference,
    RegistriesConfError, CredentialsError, StoreError, BundleError, UnsafeLayer, LayerError) are
    ValueErrors; tarfile's counts once tarfile is loaded (before that nobody can have raised
    one). Evaluated only when an exception reaches main(), as an except clause's classes are."""
    from .errors import RegistryError
    tarfile = sys.modules.get("tarfile")
    return (RegistryError, ValueError, OSError, KeyError) + ((tarfile.TarError,) if tarfile is not None else ())


def _pull(args, store: Store) -> int:
    import asyncio

    from ocispec.reference import Reference

    from . import credentials as creds
    from .export import check_output, export_docker_archive, export_oci, parse_oci_target
    from .platform import Platform
    from .progress import for_terminal
    from .pull import PullOptions, pull
    from .registries import Registries
    reference = Reference.parse(args.reference)
    if args.output:
        check_output(args.output)
        if args.output.startswith("docker-archive:") and args.all_platforms:
            raise ValueError("a docker-archive holds one platform; drop --all-platforms or use --output oci:DIR")
    registries = Registries.load(args.registries_conf)
    progress = for_terminal(args.quiet)
    options = PullOptions(platform=Platform.parse(args.platform) if args.platform else Platform.host(),
                          explicit_platform=bool(args.platform),
                          all_platforms=args.all_platforms, jobs=args.jobs, progress=progress,
                          verbose=args.verbose)
    result = asyncio.run(pull(reference, store, registries, creds.lookup, options))
    if args.output and args.output.startswith("docker-archive:"):
        repo_tag = f"{reference.name}:{reference.tag}" if reference.tag else None
        export_docker_archive(store, result.descriptor, Path(args.output.split(":", 1)[1]), repo_tag,
                              args.max_layer_bytes)
    elif args.output:
        directory, tag = parse_oci_target(args.output)
        export_oci(store, result.descriptor, directory, tag or reference.tag or "latest")
    if args.unpack:
        _unpack_into(store, result.digest, args.unpack, args)
    if not args.quiet:
        print(f"{reference}: {result.digest} ({result.downloaded} downloaded, {result.reused} already stored)")
    return 0


def _unpack(args, store: Store) -> int:
    from ocispec.digest import Digest
    from ocispec.reference import Reference

    from .store import StoreError
    reference = str(Reference.parse(args.reference))
    image = store.find(reference)
    if image is None:
        raise StoreError(f"no image {reference} in the store; kura pull it first")
    _unpack_into(store, Digest.parse(image.descriptor["digest"]), args.bundle, args)
    return 0


def _unpack_into(store: Store, digest, bundle: Path, args) -> None:
    from .bundle import unpack_image
    options = unpack_image(store, digest, bundle, allow_devices=args.allow_devices,
                           max_layer_bytes=args.max_layer_bytes)
    for note in options.notes:
        print(f"kura: note: {note}", file=sys.stderr)
    print(f"unpacked into {bundle} (rootfs/ and config.json)")


def _login(args) -> int:
    import asyncio

    from kura.prompt import ask

    from . import credentials as creds
    from .login import normalise_server, verify
    from .registries import Registries
    if args.password is not None:
        print("kura: --password would leave the password in your shell history and process list; "
              "use --password-stdin (echo \"$PASSWORD\" | kura login -u USER --password-stdin SERVER)",
              file=sys.stderr)
        return 2
    server = normalise_server(args.server)
    user = args.username
    if user is None:
        if not sys.stdin.isatty():
            raise ValueError("give -u USER when stdin is not a terminal")
        user = ask("Username: ", "username").strip()
    if not user:
        raise ValueError("empty username; nothing was sent")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = ask("Password: ", "password", secret=True)
    else:
        raise ValueError("use --password-stdin to read the password from a pipe")
    if not password:
        # It would be refused anyway, and count as a failed login towards the server's lock-out.
        raise ValueError("empty password; nothing was sent")
    credentials = creds.Credentials(user, password)
    insecure = any(e.insecure for e in Registries.load().entries if e.location == server)
    asyncio.run(verify(server, credentials, insecure))
    where = creds.save(server, credentials)
    print(f"Login Succeeded (saved in {where})")
    return 0


def _logout(args) -> int:
    from . import credentials as creds
    from .login import normalise_server
    server = normalise_server(args.server)
    if not creds.erase(server):
        print(f"kura: not logged in to {server}", file=sys.stderr)
        return 1
    print(f"Removed login credentials for {server}")
    return 0


def _push(args, store: Store) -> int:
    if not args.source.startswith(("oci-archive:", "docker-archive:")):
        return _push_from(args, store, None)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kura-push-", dir=store.scratch) as scratch:  # the unpacked archive
        return _push_from(args, store, Path(scratch))


def _push_from(args, store: Store, scratch: Path | None) -> int:
    import asyncio

    from ocispec.reference import Reference

    from . import credentials as creds
    from .progress import for_terminal
    from .push import PushOptions, Source, push, source_from_layout
    from .registries import Registries
    from .store import StoreError
    if args.source.startswith(("oci:", "oci-archive:", "docker-archive:")) and not args.destination:
        raise ValueError("name a destination when pushing from a layout or an archive")
    if args.source.startswith("oci:"):
        from .export import parse_oci_target
        directory, tag = parse_oci_target(args.source)
        source = source_from_layout(directory, tag)
    elif args.source.startswith("oci-archive:"):
        from .archives import oci_archive, split_archive_target
        file, tag = split_archive_target(args.source.split(":", 1)[1])
        source = oci_archive(file, tag, scratch)
    elif args.source.startswith("docker-archive:"):
        from .archives import docker_archive, split_archive_target
        file, ref = split_archive_target(args.source.split(":", 1)[1])
        source = docker_archive(file, ref, scratch)
    else:
        image = store.find(str(Reference.parse(args.source)))
        if image is None:
            raise StoreError(f"no image {Reference.parse(args.source)} in the store")
        source = Source(store.root, image.descriptor)
    destination = Reference.parse(args.destination or args.source)
    options = PushOptions(jobs=args.jobs, mount_from=args.mount_from, progress=for_terminal(args.quiet),
                          known_sources=store.sources, verbose=args.verbose, sessions=store)
    registries = Registries.load(args.registries_conf)
    digest, counts = asyncio.run(push(source, destination, registries, creds.lookup, options))
    endpoint = registries.endpoints(destination)[-1]
    store.record_sources(_blob_digests(source), endpoint.host, endpoint.repository)
    _report_push(args, destination, digest, counts)
    return 0


def _blob_digests(source) -> list[str]:
    """The config and layer digests of what a push sent (index children included)."""
    import json
    digests = []
    pending = [source.top["digest"]]
    while pending:
        path = source.blob(pending.pop())
        if not path.exists():
            continue
        document = json.loads(path.read_bytes())
        pending += [m["digest"] for m in document.get("manifests", [])]
        digests += [d["digest"] for d in ([document["config"]] if "config" in document else []) + document.get("layers", [])]
    return digests


def _report_push(args, destination: Reference, digest: str, counts: dict) -> None:
    if not args.quiet:
        print(f"{destination}: {digest} ({counts['uploaded']} uploaded, {counts['mounted']} mounted, "
              f"{counts['exists']} already there)")


def _tag(args, store: Store) -> int:
    from ocispec.reference import Reference

    from .store import StoreError
    source = str(Reference.parse(args.source))
    image = store.find(source)
    if image is None:
        raise StoreError(f"no image {source} in the store")
    target = Reference.parse(args.target)
    store.add(str(target), {k: v for k, v in image.descriptor.items() if k != "annotations"})
    print(f"{target} -> {image.descriptor['digest']}")
    return 0


def _inspect(args, store: Store) -> int:
    import asyncio
    import json

    from ocispec.reference import Reference, names_registry

    from . import credentials as creds
    from .display import inspect_lines
    from .platform import Platform
    from .registries import Registries
    from .remote import inspect
    from .store import StoreError
    reference = Reference.parse(args.reference)
    platform = Platform.parse(args.platform) if args.platform else None
    # A registry named outright is asked (a stored copy may be stale); a short name is local first.
    image = store.find(str(reference)) if args.local or not names_registry(args.reference) else None
    if image is not None:
        info = _inspect_stored(store, str(reference), image.descriptor, platform)
    elif args.local:
        raise StoreError(f"no image {reference} in the local store")
    else:
        info = asyncio.run(inspect(reference, Registries.load(args.registries_conf), creds.lookup, platform))
    if args.raw:
        print(info["raw"])
    elif args.config:
        print(json.dumps(info.get("config"), indent=2))
    elif args.json:
        print(json.dumps({k: v for k, v in info.items() if k not in ("raw", "config")}, indent=2))
    else:
        print("\n".join(inspect_lines(info)))
    return 0


def _inspect_stored(store: Store, reference: str, descriptor: dict, platform: Platform | None) -> dict:
    from ocispec.digest import Digest

    from .errors import RegistryError
    from .limits import CONFIG_LIMIT, MANIFEST_LIMIT
    from .remote import check_platform, describe
    from .store import StoreError
    digest, media_type, index = Digest.parse(descriptor["digest"]), descriptor["mediaType"], None
    document = store.read_json(digest, MANIFEST_LIMIT, "manifest")
    if platform is not None and "manifests" in document:
        index = digest
        digest, media_type, document = _stored_image_for(store, document, platform, reference)
    config = store.read_json(Digest.parse(document["config"]["digest"]), CONFIG_LIMIT, "image config") \
        if "config" in document else None
    info = describe(reference, digest, media_type, store.read_blob(digest), document, config)
    if index is not None:
        info["index"] = str(index)
    try:
        check_platform(info, platform)
    except RegistryError as exc:
        raise StoreError(f"{exc} in the local store; to ask the registry: "
                         f"kura inspect --platform {platform} {reference}") from None
    return {**info, "source": "local"}


def _stored_image_for(store: Store, index: dict, wanted: Platform, reference: str) -> tuple[Digest, str, dict]:
    """The stored image for `wanted` below a stored index (nested ones too), as a pull chose it."""
    from ocispec import mediatypes as mt
    from ocispec.digest import Digest

    from .limits import MANIFEST_LIMIT
    from .platform import Platform, matching, platforms_in, runnable_entries
    from .pull import MAX_INDEX_DEPTH
    from .store import StoreError
    levels, available = [index], set()
    for _ in range(MAX_INDEX_DEPTH):
        deeper = []
        for document in levels:
            available |= platforms_in(document)
            unlabelled = [e for e in runnable_entries(document)
                          if Platform.of(e) is None and e.get("mediaType") in mt.INDEXES]
            for entry in matching(document, wanted) + unlabelled:
                digest = Digest.parse(entry["digest"])
                if not store.has_blob(digest):
                    continue
                child = store.read_json(digest, MANIFEST_LIMIT, "manifest")
                if "manifests" in child:
                    deeper.append(child)
                elif Platform.of(entry) is not None:
                    return digest, entry["mediaType"], child
        levels = deeper
    raise StoreError(f"no image for platform {wanted} in the stored {reference}; stored platforms: "
                     f"{', '.join(sorted(available)) or 'none'}")


def _tags(args) -> int:
    import asyncio
    import json

    from ocispec.reference import Reference

    from . import credentials as creds
    from .errors import printable
    from .registries import Registries
    from .remote import list_tags
    tags = asyncio.run(list_tags(Reference.parse(args.reference), Registries.load(args.registries_conf), creds.lookup))
    print(json.dumps(tags) if args.json else "\n".join(printable(tag) for tag in tags))
    return 0


def _delete(args) -> int:
    import asyncio

    from kura.prompt import confirm
    from ocispec.reference import Reference

    from . import credentials as creds
    from .registries import Registries
    from .remote import delete_manifest, delete_tag
    reference = Reference.parse(args.reference)
    registries = Registries.load(args.registries_conf)
    digest = reference.digest
    if digest is None:
        kept = asyncio.run(delete_tag(reference, registries, creds.lookup))
        if kept is None:
            print(f"deleted tag {reference} (the manifest stays, with any other tags pointing at it)")
            return 0
        digest = kept.digest
        # Asked outside the event loop, where Ctrl-C is a plain KeyboardInterrupt.
        what = (f"{reference.domain} refused to delete the tag by itself ({kept.reason}): deleting {reference} "
                f"means deleting manifest {digest}, and with it every tag that points at it")
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError(f"{what}; pass --yes to do that")
            if not confirm(f"{what}.\nDelete manifest {digest}? [y/N] "):
                raise ValueError("nothing deleted")
    asyncio.run(delete_manifest(reference, digest, registries, creds.lookup))
    print(f"deleted manifest {digest} from {reference.name}, and with it every tag that pointed at it")
    return 0


def _copy(args) -> int:
    """Through a private scratch store: pull (or read a layout or an archive), then push or export."""
    import asyncio
    import tempfile

    from ocispec.reference import Reference

    from . import credentials as creds
    from .archives import docker_archive, oci_archive, split_archive_target
    from .export import check_output, export_docker_archive, export_oci, parse_oci_target
    from .platform import Platform
    from .progress import for_terminal
    from .pull import PullOptions, pull
    from .push import PushOptions, Source, push, source_from_layout
    from .registries import Registries
    from .store import Store
    registries = Registries.load(args.registries_conf)
    progress = for_terminal(args.quiet)
    to_files = args.destination.startswith(("oci:", "docker-archive:"))
    if to_files:
        check_output(args.destination)
        if args.destination.startswith("docker-archive:") and args.all_platforms:
            raise ValueError("a docker-archive holds one platform; drop --all-platforms or copy to oci:DIR")
    with tempfile.TemporaryDirectory(prefix="kura-copy-") as scratch:
        if args.source.startswith("oci:"):
            directory, tag = parse_oci_target(args.source)
            source = source_from_layout(directory, tag)
            store = None
        elif args.source.startswith(("oci-archive:", "docker-archive:")):
            kind, rest = args.source.split(":", 1)
            file, name = split_archive_target(rest)
            if not file.is_file():
                raise ValueError(f"{file} {'is not a file' if file.exists() else 'does not exist'} "
                                 f"({kind}:FILE.tar needs an archive)")
            unpacked = Path(scratch) / "archive"
            unpacked.mkdir()
            source = (oci_archive if kind == "oci-archive" else docker_archive)(file, name, unpacked)
            store = Store(unpacked)  # a layout now, which can be exported like a pulled image
        else:
            store = Store(Path(scratch))
            options = PullOptions(platform=Platform.parse(args.platform) if args.platform else Platform.host(),
                                  explicit_platform=bool(args.platform),
                                  all_platforms=args.all_platforms, progress=progress, verbose=args.verbose)
            result = asyncio.run(pull(Reference.parse(args.source), store, registries, creds.lookup, options))
            source = Source(store.root, result.descriptor)
        if to_files:
            if store is None:
                raise ValueError("copying from a layout to a layout or archive: use the files as they are")
            if args.destination.startswith("oci:"):
                directory, tag = parse_oci_target(args.destination)
                export_oci(store, source.top, directory, tag or "latest")
            else:
                export_docker_archive(store, source.top, Path(args.destination.split(":", 1)[1]), None)
        else:
            destination = Reference.parse(args.destination)
            # Blobs pulled from the destination's own registry are mounted from their repository.
            known = store.sources if store is not None else None
            digest, counts = asyncio.run(push(source, destination, registries, creds.lookup,
                                              PushOptions(progress=progress, known_sources=known,
                                                          verbose=args.verbose)))
            _report_push(args, destination, digest, counts)
    return 0


def _images(args, store: Store) -> int:
    import json

    from .display import human_size
    from .errors import printable
    rows = []
    for image in store.images():
        d = image.descriptor
        rows.append({"reference": image.reference, "digest": d["digest"], "mediaType": d["mediaType"],
                     "platform": _stored_platform(store, d), "size": _image_size(store, d)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'REFERENCE':50} {'DIGEST':20} {'PLATFORM':16} SIZE")
    for row in rows:
        print(f"{printable(row['reference']):50} {row['digest'][7:19]:20} {printable(row['platform']) or '-':16} "
              f"{human_size(row['size'])}")
    return 0


def _stored_platform(store: Store, descriptor: dict) -> str:
    """The platform a pull chose from an index, else the one the image's config states ("" for
    an index, or when the image cannot say)."""
    from ocispec.digest import Digest

    from .limits import CONFIG_LIMIT, MANIFEST_LIMIT
    from .platform import Platform
    from .store import StoreError
    platform = descriptor.get("platform") or {}
    if platform:
        return "/".join(str(x) for x in (platform.get("os"), platform.get("architecture"),
                                         platform.get("variant")) if x)
    try:
        document = store.read_json(Digest.parse(descriptor["digest"]), MANIFEST_LIMIT, "manifest")
        if "config" not in document:
            return ""
        config = store.read_json(Digest.parse(document["config"]["digest"]), CONFIG_LIMIT, "image config")
        return str(Platform.of_config(config) or "")
    except (StoreError, OSError, ValueError, KeyError, TypeError):
        return ""  # one unreadable image must not hide the list


def _image_size(store: Store, descriptor: dict) -> int:
    from ocispec.digest import Digest
    total = 0
    for digest in store.reachable(Digest.parse(descriptor["digest"])):
        path = store.blob_path(digest)
        if path.exists():
            total += path.stat().st_size
    return total


def _rmi(args, store: Store) -> int:
    from ocispec.reference import Reference
    reference = str(Reference.parse(args.reference))
    removed = store.remove(reference)
    print(f"removed {reference} ({len(removed)} blobs freed)")
    return 0


# Commands by whether they work on the local store (which is created on first use).
WITHOUT_STORE = {"login": _login, "logout": _logout, "tags": _tags, "delete": _delete, "copy": _copy}
WITH_STORE = {"pull": _pull, "push": _push, "images": _images, "rmi": _rmi, "unpack": _unpack,
              "tag": _tag, "inspect": _inspect}
