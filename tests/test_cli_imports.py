"""The client's start-up cost: `kura` loads only what the command at hand uses.

Building the parser, `--help` and a usage error never import the HTTP stack (aiohttp, asyncio,
ssl), cryptography, tarfile, the store or the unpacker; a pull or a push from an OCI layout
never imports tarfile or the unpacker. Each check runs a fresh interpreter and lists what it
loaded, so a top-level import re-added to puller/cli.py (or to a module a command needs)
fails here."""

import hashlib
import json
import subprocess
import sys

from tests.support.cli import client_env
from tests.support.paths import REPO
from tests.support.servers import free_port

NEVER_FOR_HELP = ("aiohttp", "asyncio", "ssl", "cryptography", "tarfile", "puller.transport", "puller.pull",
                  "puller.push", "puller.store", "puller.bundle", "puller.unpack", "puller.export",
                  "puller.credentials", "registry")
NEVER_FOR_TRANSFERS = ("tarfile", "cryptography", "puller.bundle", "puller.unpack", "puller.archives",
                       "puller.tarreader", "registry")


def loaded_after(code: str, home) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (which may exit)."""
    program = ("import atexit, json, sys\n"
               "atexit.register(lambda: print('MODULES=' + json.dumps(sorted(sys.modules)), file=sys.__stderr__))\n"
               + code)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=client_env(home), capture_output=True,
                            text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.startswith("MODULES=")]
    assert lines, result.stderr
    return set(json.loads(lines[-1].removeprefix("MODULES=")))


def heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == name or m.startswith(name + ".") for name in names))


def test_parser_and_help_import_nothing_heavy(tmp_path):
    from kura.__main__ import CLIENT_COMMANDS
    code = ("import contextlib, io\n"
            "from puller.cli import build_parser, main\n"
            "build_parser()\n"
            f"for command in {CLIENT_COMMANDS!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main([command, '--help'])\n")
    modules = loaded_after(code, tmp_path)
    assert "puller.cli" in modules
    assert heavy(modules, NEVER_FOR_HELP) == []


def test_kura_pull_help_and_a_usage_error_import_nothing_heavy(tmp_path):
    """Through the dispatcher, as `python -m kura` runs it."""
    for argv in (["pull", "--help"], ["pull", "--bogus", "redis"]):
        code = f"import runpy, sys\nsys.argv = ['kura', *{argv!r}]\nrunpy.run_module('kura', run_name='__main__')\n"
        modules = loaded_after(code, tmp_path)
        assert "puller.cli" in modules
        assert heavy(modules, NEVER_FOR_HELP) == [], argv


def test_a_pull_imports_neither_tarfile_nor_the_unpacker(tmp_path):
    port = free_port()  # nobody listens: the pull fails at its first request, after all its imports
    code = ("import sys\nfrom puller.cli import main\n"
            f"sys.exit(main(['pull', '-q', '--store', {str(tmp_path / 'store')!r}, '127.0.0.1:{port}/x:1']))\n")
    modules = loaded_after(code, tmp_path)
    assert "aiohttp" in modules and "puller.pull" in modules  # it got as far as the network
    assert heavy(modules, NEVER_FOR_TRANSFERS) == []


def test_a_push_from_a_layout_imports_neither_tarfile_nor_the_unpacker(tmp_path):
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = {"mediaType": "application/vnd.oci.image.config.v1+json",
              **blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')}
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": config, "layers": []}).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
         "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
    port = free_port()
    code = ("import sys\nfrom puller.cli import main\n"
            f"sys.exit(main(['push', '-q', '--store', {str(tmp_path / 'store')!r}, 'oci:{layout}:1', "
            f"'127.0.0.1:{port}/x:1']))\n")
    modules = loaded_after(code, tmp_path)
    assert "aiohttp" in modules and "puller.push" in modules
    assert heavy(modules, NEVER_FOR_TRANSFERS) == []


def test_the_client_imports_aiohttp_without_reading_cas_for_a_context_that_verifies_nothing(tmp_path):
    """puller/aiohttp_loader.py: aiohttp's `ssl=False` context skips the CA bundle (it never
    consults it); its verifying context holds exactly what the system's default one does; the
    garbage collector runs again afterwards."""
    code = ("import gc, json, ssl, sys\n"
            "import puller.pull, puller.push, puller.remote, puller.login\n"
            "from aiohttp import connector\n"
            "print('STATE=' + json.dumps({\n"
            "    'verifying': connector._SSL_CONTEXT_VERIFIED.cert_store_stats(),\n"
            "    'verifying_mode': int(connector._SSL_CONTEXT_VERIFIED.verify_mode),\n"
            "    'system': ssl.create_default_context().cert_store_stats(),\n"
            "    'unverified': connector._SSL_CONTEXT_UNVERIFIED.cert_store_stats(),\n"
            "    'unverified_mode': int(connector._SSL_CONTEXT_UNVERIFIED.verify_mode),\n"
            "    'patch_left': 'set_default_verify_paths' in ssl.SSLContext.__dict__,\n"
            "    'collecting': gc.isenabled()}), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=client_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    state = json.loads(next(line for line in result.stderr.splitlines() if line.startswith("STATE="))[6:])
    assert state["verifying"] == state["system"] and state["verifying_mode"] == 2  # ssl.CERT_REQUIRED
    assert state["unverified_mode"] == 0 and state["unverified"]["x509_ca"] == 0  # ssl.CERT_NONE, nothing read
    assert not state["patch_left"] and state["collecting"]
