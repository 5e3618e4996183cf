"""The `kura` client command against a hostile registry and hostile archives: whatever it is
sent, it ends in one `kura: ...` line and a non-zero exit (never a traceback), prints no
terminal control sequence it was given, resolves nested indexes within bounds, and sends no
empty password."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile

import pytest

from tests.support.cli import kura, one_line_error
from tests.support.faulty_registry import OCI_INDEX, Faults, image, index_of, make_app, sha256

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64"}
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE_TEXT = ["\x1b]0;owned\x07", "\x1b[2J\x1b[H", "\x9b31m", "bidi\u202eevil", "two\nlines"]


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


LAYER = tar_of({"hello.txt": b"hello\n"})


@pytest.fixture
async def registry(aiohttp_server):
    async def serve(layer: bytes = LAYER, **changes) -> tuple[str, Faults]:
        faults = Faults(**changes)
        server = await aiohttp_server(make_app(layer, faults))
        return f"127.0.0.1:{server.port}", faults
    return serve


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def no_control_characters(text: str) -> None:
    found = CONTROL.findall(text.replace("\n", ""))
    assert not found, f"control characters reach the terminal: {found!r} in {text!r}"


def manifest_document() -> dict:
    return json.loads(image(LAYER)[0])


# ------------------------------------------------- malformed documents: one line, no traceback

def _set(path: list, value):
    def change(document: dict) -> bytes:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return json.dumps(document).encode()
    return change


MALFORMED = {
    "size is a string": _set(["layers", 0, "size"], "107"),
    "layers is a string": _set(["layers"], "abc"),
    "config is a list": _set(["config"], ["a"]),
    "layer digest is a number": _set(["layers", 0, "digest"], 5),
    "nested 100k deep": lambda _: b'{"schemaVersion": 2, "annotations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "index entry without digest": lambda _: json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                        "manifests": [{"platform": AMD64}]}).encode(),
    "platform os is a list": lambda _: json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(b"x"), "size": 1,
         "platform": {"os": ["linux"], "architecture": "amd64"}}]}).encode(),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("command", ["pull", "inspect"])
async def test_malformed_manifest_is_a_one_line_error(case, command, registry, home):
    host, _ = await registry(manifests={"bad": MALFORMED[case](manifest_document())})
    args = ["pull", "--quiet", "--platform", "linux/amd64"] if command == "pull" else ["inspect"]
    one_line_error(await kura(home, *args, f"{host}/hostile:bad"))
    assert "hostile" not in (await kura(home, "images")).stdout  # nothing recorded


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 16]) + data[middle + 16:]


BAD_LAYERS = {
    "corrupt gzip": (GZIP, lambda: corrupt(gzip.compress(tar_of({"f": bytes(range(256)) * 400})))),
    "truncated gzip": (GZIP, lambda: gzip.compress(tar_of({"f": bytes(range(256)) * 400}))[:-100]),
    "not gzip at all": (GZIP, lambda: b"this is no gzip stream"),
    "corrupt zstd": (ZSTD, lambda: b"\x28\xb5\x2f\xfd" + b"\xff" * 64),
}


@pytest.mark.parametrize("case", BAD_LAYERS)
async def test_undecodable_layer_is_a_one_line_error(case, registry, home, tmp_path):
    media_type, build = BAD_LAYERS[case]
    host, _ = await registry(build(), layer_media_type=media_type)
    for output in (["--unpack", str(tmp_path / "bundle")], ["--output", f"docker-archive:{tmp_path / 'x.tar'}"]):
        message = one_line_error(await kura(home, "pull", "--quiet", *output, f"{host}/hostile:layer"))
        assert "gzip" in message or "zstd" in message, message
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()


def chained_extended_headers(count: int) -> bytes:
    record = b"12 comment=\n"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    block = header.tobuf(tarfile.USTAR_FORMAT) + record + bytes(512 - len(record))
    return gzip.compress(block * count + tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024))


def gnu_sparse() -> bytes:
    header = bytearray(tarfile.TarInfo("sparse").tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return gzip.compress(bytes(header) + bytes(1024))


UNSAFE_LAYERS = {
    "400 chained extended headers": (chained_extended_headers(400), "extended headers"),  # was a RecursionError
    "GNU sparse file": (gnu_sparse(), "sparse"),
}


@pytest.mark.parametrize("case", UNSAFE_LAYERS)
async def test_unsafe_tar_headers_are_a_one_line_error(case, registry, home, tmp_path):
    layer, expected = UNSAFE_LAYERS[case]
    host, _ = await registry(layer, layer_media_type=GZIP)
    message = one_line_error(await kura(home, "pull", "--quiet", "--unpack", str(tmp_path / "bundle"),
                                        f"{host}/hostile:layer"))
    assert expected in message, message


# ------------------------------------------------------------- hostile archives (kura push)

def archive_with(path, members: list[tuple[str, str, bytes]]) -> None:
    """members: (name, kind, data-or-link-target)."""
    with tarfile.open(path, "w") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = data.decode()
                archive.addfile(info)


DOCKER_CONFIG = json.dumps({"architecture": "amd64", "os": "linux",
                            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
DOCKER_MANIFEST = json.dumps([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["layer.tar"]}]).encode()
ARCHIVES = {
    "docker: manifest.json is a symlink loop": ("docker-archive", [
        ("manifest.json", "symlink", b"a.json"), ("a.json", "symlink", b"manifest.json")]),
    "docker: config is a symlink to itself": ("docker-archive", [
        ("manifest.json", "file", DOCKER_MANIFEST), ("config.json", "symlink", b"config.json"),
        ("layer.tar", "file", LAYER)]),
    "docker: layer is a symlink loop": ("docker-archive", [
        ("manifest.json", "file", DOCKER_MANIFEST), ("config.json", "file", DOCKER_CONFIG),
        ("layer.tar", "symlink", b"dir/../other.tar"), ("other.tar", "symlink", b"layer.tar")]),
    "docker: layer is a hardlink to nothing": ("docker-archive", [
        ("manifest.json", "file", DOCKER_MANIFEST), ("config.json", "file", DOCKER_CONFIG),
        ("layer.tar", "hardlink", b"missing.tar")]),
    "docker: corrupt gzip layer": ("docker-archive", [
        ("manifest.json", "file", DOCKER_MANIFEST), ("config.json", "file", DOCKER_CONFIG),
        ("layer.tar", "file", corrupt(gzip.compress(bytes(range(256)) * 400)))]),
    "docker: manifest.json nested 100k deep": ("docker-archive", [
        ("manifest.json", "file", b"[" * 100_000 + b"]" * 100_000)]),
    "docker: config nested 100k deep": ("docker-archive", [
        ("manifest.json", "file", DOCKER_MANIFEST), ("config.json", "file", b"[" * 100_000 + b"]" * 100_000),
        ("layer.tar", "file", LAYER)]),
    "oci: index.json is a symlink loop": ("oci-archive", [
        ("oci-layout", "file", b'{"imageLayoutVersion": "1.0.0"}'),
        ("index.json", "symlink", b"index.json")]),
    "oci: index.json nested 100k deep": ("oci-archive", [
        ("oci-layout", "file", b'{"imageLayoutVersion": "1.0.0"}'),
        ("index.json", "file", b'{"manifests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")]),
}


@pytest.mark.parametrize("case", ARCHIVES)
async def test_hostile_archive_is_a_one_line_error(case, home, tmp_path):
    kind, members = ARCHIVES[case]
    path = tmp_path / "hostile.tar"
    archive_with(path, members)
    # Refused while reading the archive: the destination is never contacted (nothing listens there).
    one_line_error(await kura(home, "push", "--quiet", f"{kind}:{path}", "127.0.0.1:9/hostile:1"))


# ------------------------------------------------------- terminal escapes in human output

async def test_tags_are_printed_without_control_characters(registry, home):
    tags = ["1.0", *HOSTILE_TEXT]
    host, _ = await registry(tags=tags)
    ran = await kura(home, "tags", f"{host}/hostile")
    assert ran.returncode == 0, ran.stderr
    no_control_characters(ran.stdout)
    assert len(ran.stdout.splitlines()) == len(tags)  # one line per tag, whatever it holds
    assert ran.stdout.splitlines()[0] == "1.0"
    as_json = await kura(home, "tags", "--json", f"{host}/hostile")
    assert json.loads(as_json.stdout) == tags  # exact, and escaped by JSON itself
    no_control_characters(as_json.stdout)


async def test_tags_that_are_not_strings_are_a_one_line_error(registry, home):
    host, _ = await registry(tags=["1.0", 7, {"a": 1}])
    one_line_error(await kura(home, "tags", f"{host}/hostile"))


def hostile_config() -> bytes:
    return json.dumps({"architecture": "amd64\x1b[2J", "os": "linux\x1b]0;owned\x07", "created": "\x1b[H\x1b[2J",
                       "author": "\x1b]0;owned\x07", "config": {"Entrypoint": ["\x1b[31m/bin/sh"],
                                                                 "Cmd": ["-c", "\x9b2J"],
                                                                 "Env": ["A=\x1b[2J"], "WorkingDir": "/\x1b[H",
                                                                 "ExposedPorts": {"80\x1b[2J/tcp": {}},
                                                                 "Labels": {"\x1b]0;k\x07": "v\u202e"}},
                       "rootfs": {"type": "layers", "diff_ids": []}}).encode()


async def test_inspect_prints_no_control_characters_from_the_image(registry, home):
    host, _ = await registry(config=hostile_config())
    remote = await kura(home, "inspect", f"{host}/hostile:1")
    assert remote.returncode == 0, remote.stderr
    no_control_characters(remote.stdout)
    for label in ("Created:", "Entrypoint:", "Env:", "WorkingDir:", "Ports:", "Labels:"):
        assert label in remote.stdout
    assert (await kura(home, "pull", "--quiet", f"{host}/hostile:1")).returncode == 0
    local = await kura(home, "inspect", "--local", f"{host}/hostile:1")
    assert local.returncode == 0, local.stderr
    assert "Source:     local store" in local.stdout
    no_control_characters(local.stdout)
    for flag in ("--json", "--config"):
        machine = await kura(home, "inspect", "--local", flag, f"{host}/hostile:1")
        assert machine.returncode == 0 and json.loads(machine.stdout)
        no_control_characters(machine.stdout)


async def test_platforms_from_an_index_are_printed_without_control_characters(registry, home):
    manifest = image(LAYER)[0]
    evil = {**AMD64, "variant": "v1\x1b]0;owned\x07", "os.version": "\x1b[2J"}
    index = index_of((manifest, evil), (manifest, {**ARM64, "variant": "\x1b[2J"}))
    host, _ = await registry(manifests={"evil": index})
    inspected = await kura(home, "inspect", f"{host}/hostile:evil")
    assert inspected.returncode == 0, inspected.stderr
    no_control_characters(inspected.stdout)
    assert (await kura(home, "pull", "--quiet", "--platform", "linux/amd64", f"{host}/hostile:evil")).returncode == 0
    images = await kura(home, "images")
    assert images.returncode == 0, images.stderr
    no_control_characters(images.stdout)
    assert "linux/amd64/v1" in images.stdout


# ------------------------------------------------------------------------ nested indexes

def other_image() -> bytes:
    """The same image under another digest, for a second platform."""
    document = manifest_document()
    document["annotations"] = {"org.opencontainers.image.title": "arm64"}
    return json.dumps(document).encode()


def nested(depth: int, leaf_platform: dict | None = AMD64, outer_platform: dict | None = None) -> dict[str, bytes]:
    """Tag "nested": `depth` indexes in all, each holding the next (with `outer_platform`), the
    innermost holding an arm64 image and the image for `leaf_platform`."""
    arm64 = other_image()
    document = index_of((arm64, ARM64), (image(LAYER)[0], leaf_platform))
    documents = {sha256(arm64): arm64}
    for _ in range(depth - 1):
        documents[sha256(document)] = document
        document = index_of((document, outer_platform))
    documents["nested"] = document
    return documents


@pytest.mark.parametrize("depth, outer_platform", [(2, None), (2, AMD64), (4, None)],
                         ids=["outer entry without platform", "outer entry with platform", "four levels"])
async def test_nested_index_resolves_to_the_platform_image(depth, outer_platform, registry, home, tmp_path):
    host, faults = await registry(manifests=nested(depth, outer_platform=outer_platform))
    bundle = tmp_path / "bundle"
    ran = await kura(home, "pull", "--quiet", "--platform", "linux/amd64", "--unpack", str(bundle),
                     f"{host}/hostile:nested")
    assert ran.returncode == 0, ran.stderr
    assert (bundle / "rootfs" / "hello.txt").read_bytes() == b"hello\n"
    [stored] = json.loads((await kura(home, "images", "--json")).stdout)
    assert stored["digest"] == sha256(image(LAYER)[0]) and stored["platform"] == "linux/amd64"
    assert not any(sha256(other_image()) in r for r in faults.requests)  # only what this platform needs


async def test_nested_index_with_every_platform(registry, home):
    documents = nested(3)
    host, faults = await registry(manifests=documents)
    ran = await kura(home, "pull", "--quiet", "--all-platforms", f"{host}/hostile:nested")
    assert ran.returncode == 0, ran.stderr
    assert any(sha256(LAYER)[:15] in r for r in faults.requests)  # the images' blobs were fetched
    assert any(sha256(other_image()) in r for r in faults.requests)
    [stored] = json.loads((await kura(home, "images", "--json")).stdout)
    assert stored["digest"] == sha256(documents["nested"])


async def test_nested_index_has_no_such_platform(registry, home):
    host, _ = await registry(manifests=nested(2, leaf_platform={"os": "linux", "architecture": "s390x"}))
    message = one_line_error(await kura(home, "pull", "--quiet", "--platform", "linux/amd64",
                                        f"{host}/hostile:nested"))
    assert "linux/amd64" in message and "linux/s390x" in message and "linux/arm64" in message


@pytest.mark.parametrize("all_platforms", [False, True])
async def test_index_nesting_is_bounded(all_platforms, registry, home):
    host, faults = await registry(manifests=nested(6, outer_platform=AMD64))
    flags = ["--all-platforms"] if all_platforms else ["--platform", "linux/amd64"]
    message = one_line_error(await kura(home, "pull", "--quiet", *flags, f"{host}/hostile:nested"))
    assert "nested" in message
    assert len([r for r in faults.requests if r.startswith("GET manifest")]) <= 5
    assert json.loads((await kura(home, "images", "--json")).stdout) == []


def variant_image(i: int) -> bytes:
    """The same image under as many digests as wanted."""
    document = manifest_document()
    document["annotations"] = {"n": str(i)}
    return json.dumps(document).encode()


def index_over(entries: list[tuple[bytes, dict | None]], claim_index: bool = False) -> bytes:
    """An index over (document, platform) pairs; with `claim_index`, every entry says it is an
    index, whatever it is (so one without a platform may hold the platform and is followed)."""
    document = json.loads(index_of(*entries))
    if claim_index:
        for entry in document["manifests"]:
            entry["mediaType"] = OCI_INDEX
    return json.dumps(document).encode()


def manifest_requests(faults: Faults) -> int:
    return len([r for r in faults.requests if r.startswith("GET manifest")])


async def test_number_of_nested_indexes_is_bounded(registry, home):
    """Shallow but wide: 20 indexes side by side, none with the platform, are searched up to
    MAX_NESTED_INDEXES (16)."""
    s390x = {"os": "linux", "architecture": "s390x"}
    inner = [index_over([(variant_image(i), s390x)]) for i in range(20)]
    documents = {sha256(d): d for d in inner}
    documents["wide"] = index_over([(d, None) for d in inner])
    host, faults = await registry(manifests=documents)
    message = one_line_error(await kura(home, "pull", "--quiet", "--platform", "linux/amd64", f"{host}/hostile:wide"))
    assert "more than 16" in message
    assert manifest_requests(faults) == 1 + 17


async def test_platformless_entries_that_are_images_are_bounded(registry, home):
    """An entry without a platform that says it is an index may hold the platform, so it is
    fetched; if it is an image it is of no use. 300 of them are not all fetched."""
    images = [variant_image(i) for i in range(300)]
    documents = {sha256(d): d for d in images}
    documents["wide"] = index_over([(d, None) for d in images], claim_index=True)
    host, faults = await registry(manifests=documents)
    message = one_line_error(await kura(home, "pull", "--quiet", "--platform", "linux/amd64", f"{host}/hostile:wide"))
    assert "more than 128 manifests" in message
    assert manifest_requests(faults) == 1 + 128


async def test_every_platform_of_a_very_wide_index_is_bounded(registry, home):
    images = [variant_image(i) for i in range(300)]
    documents = {sha256(d): d for d in images}
    documents["wide"] = index_over([(d, AMD64) for d in images])
    host, faults = await registry(manifests=documents)
    message = one_line_error(await kura(home, "pull", "--quiet", "--all-platforms", f"{host}/hostile:wide"))
    assert "more than 128 manifests" in message
    assert manifest_requests(faults) == 1 + 128
    assert json.loads((await kura(home, "images", "--json")).stdout) == []


@pytest.mark.parametrize("all_platforms", [False, True])
async def test_repeated_entries_are_fetched_once(all_platforms, registry, home):
    """The same index or image listed again and again (here 300 times, at two levels) is
    fetched and walked once."""
    s390x = {"os": "linux", "architecture": "s390x"}
    leaf = variant_image(0)
    inner = index_over([(leaf, s390x)] * 300)
    documents = {sha256(leaf): leaf, sha256(inner): inner, "wide": index_over([(inner, None)] * 300)}
    host, faults = await registry(manifests=documents)
    flags = ["--all-platforms"] if all_platforms else ["--platform", "linux/amd64"]
    ran = await kura(home, "pull", "--quiet", *flags, f"{host}/hostile:wide")
    if all_platforms:
        assert ran.returncode == 0, ran.stderr
        [stored] = json.loads((await kura(home, "images", "--json")).stdout)
        assert stored["digest"] == sha256(documents["wide"])
    else:
        assert "linux/s390x" in one_line_error(ran)
    assert manifest_requests(faults) == (3 if all_platforms else 2)  # the s390x image is no candidate


# ------------------------------------------------------------------------------- login

@pytest.mark.parametrize("user, password", [("alice", b"\n"), ("alice", b""), ("", b"secret\n")],
                         ids=["empty line", "nothing on stdin", "empty user"])
async def test_login_with_an_empty_password_or_user_sends_nothing(user, password, registry, home):
    host, faults = await registry()
    ran = await kura(home, "login", "-u", user, "--password-stdin", host, stdin=password)
    message = one_line_error(ran)
    assert "empty" in message
    assert faults.requests == []
    assert not (home / "docker" / "config.json").exists()


async def test_null_fields_of_the_other_shape_are_absent(registry, home):
    """As registries read them: an image manifest with `"manifests": null` is an image."""
    document = {**manifest_document(), "manifests": None}
    host, _ = await registry(manifests={"v1": json.dumps(document).encode()})
    ran = await kura(home, "pull", "-q", f"{host}/app:v1")
    assert ran.returncode == 0, ran.stderr
