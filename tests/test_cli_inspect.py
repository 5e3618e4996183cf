"""`kura inspect`: where it looks (registry or local store, and it says which), what it shows of
an image's config, and `--platform` for an index; against an in-process registry."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import kura, one_line_error
from tests.support.faulty_registry import Faults, image, index_of, make_app, sha256

AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64"}
LAYER = b"not even a tar: inspect never reads layers"

CONFIG = json.dumps({
    "architecture": "amd64", "os": "linux", "created": "2024-05-01T10:00:00Z",
    "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hello world"],
               "ExposedPorts": {"6379/tcp": {}, "53/udp": {}}, "WorkingDir": "/data",
               "Labels": {"org.example.team": "storage", "org.example.note": "two words"},
               "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo \"$GREETING\" > /tmp/it's"]},
    "rootfs": {"type": "layers", "diff_ids": []}}).encode()
ARM64_CONFIG = json.dumps({"architecture": "arm64", "os": "linux", "config": {"Cmd": ["sh"]},
                           "rootfs": {"type": "layers", "diff_ids": []}}).encode()


@pytest.fixture
async def registry(aiohttp_server):
    async def serve(**changes):
        faults = Faults(**changes)
        server = await aiohttp_server(make_app(LAYER, faults))
        return f"127.0.0.1:{server.port}", faults
    return serve


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def other_manifest() -> bytes:
    return image(LAYER, config=ARM64_CONFIG)[0]


async def inspect_json(home, *args) -> dict:
    ran = await kura(home, "inspect", "--json", *args)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


# ------------------------------------------------------------------- where inspect looks

async def test_a_registry_reference_asks_the_registry_not_a_stale_local_copy(registry, home):
    host, faults = await registry(blobs={sha256(ARM64_CONFIG): ARM64_CONFIG})
    pulled_digest = sha256(image(LAYER)[0])
    assert (await kura(home, "pull", "--quiet", f"{host}/repo:1")).returncode == 0
    faults.manifests["1"] = other_manifest()  # the tag moved on since the pull

    remote = await inspect_json(home, f"{host}/repo:1")
    assert remote["digest"] == sha256(other_manifest())
    assert remote["source"] == "registry" and remote["registry"] == host
    text = (await kura(home, "inspect", f"{host}/repo:1")).stdout
    assert f"Source:     registry {host}\n" in text and sha256(other_manifest()) in text

    local = await inspect_json(home, "--local", f"{host}/repo:1")
    assert local["digest"] == pulled_digest and local["source"] == "local" and "registry" not in local
    assert "Source:     local store\n" in (await kura(home, "inspect", "--local", f"{host}/repo:1")).stdout


async def test_a_short_name_reads_the_local_store_first(registry, home):
    host, faults = await registry()
    assert (await kura(home, "pull", "--quiet", f"{host}/repo:1")).returncode == 0
    assert (await kura(home, "tag", f"{host}/repo:1", "mine:1")).returncode == 0
    asked = len(faults.requests)
    short = await inspect_json(home, "mine:1")
    assert short["source"] == "local" and short["digest"] == sha256(image(LAYER)[0])
    assert short["reference"] == "docker.io/library/mine:1"
    assert len(faults.requests) == asked  # the registry was not asked


async def test_local_inspect_of_an_image_not_in_the_store(registry, home):
    host, faults = await registry()
    message = one_line_error(await kura(home, "inspect", "--local", f"{host}/repo:1"))
    assert message == f"kura: no image {host}/repo:1 in the local store"
    assert faults.requests == []


# ------------------------------------------------------------------------- what it shows

async def test_inspect_shows_the_config_people_look_for(registry, home):
    host, _ = await registry(config=CONFIG)
    ran = await kura(home, "inspect", f"{host}/repo:1")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    for expected in ["Platform:   linux/amd64",
                     "Created:    2024-05-01T10:00:00Z",
                     "Entrypoint: /bin/sh -c",
                     """Cmd:        'echo "$GREETING" > /tmp/it'"'"'s'""",
                     "WorkingDir: /data",
                     "Env:        PATH=/usr/bin:/bin",
                     "            GREETING=hello world",
                     "Ports:      53/udp, 6379/tcp",
                     "Labels:     org.example.note=two words",
                     "            org.example.team=storage",
                     f"Layer:      {sha256(LAYER)} ({len(LAYER)} B)"]:
        assert expected in lines, (expected, ran.stdout)
    info = await inspect_json(home, f"{host}/repo:1")
    assert info["env"] == ["PATH=/usr/bin:/bin", "GREETING=hello world"]
    assert info["exposedPorts"] == ["53/udp", "6379/tcp"] and info["workingDir"] == "/data"
    assert info["labels"] == {"org.example.team": "storage", "org.example.note": "two words"}
    assert info["entrypoint"] == ["/bin/sh", "-c"] and info["cmd"] == ["echo \"$GREETING\" > /tmp/it's"]
    assert info["layers"][0]["size"] == len(LAYER)


async def test_config_fields_of_the_wrong_type_are_shown_as_text_not_a_crash(registry, home):
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": "PATH=/bin", "ExposedPorts": ["80/tcp"], "Labels": ["x"],
                                    "Cmd": "sh -c true", "Entrypoint": [1, None], "WorkingDir": 5},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    host, _ = await registry(config=config)
    ran = await kura(home, "inspect", f"{host}/repo:1")
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert "Cmd:        sh -c true" in ran.stdout.splitlines()


# ----------------------------------------------------------------- --platform of an index

async def serve_index(registry):
    index = index_of((image(LAYER)[0], AMD64), (other_manifest(), {**ARM64, "variant": "v8"}))
    host, faults = await registry(manifests={"multi": index, sha256(other_manifest()): other_manifest()},
                                  blobs={sha256(ARM64_CONFIG): ARM64_CONFIG})
    return host, index


async def test_platform_picks_the_image_of_an_index(registry, home):
    host, index = await serve_index(registry)
    whole = await inspect_json(home, f"{host}/repo:multi")
    assert whole["platforms"] == ["linux/amd64", "linux/arm64/v8"] and whole["digest"] == sha256(index)

    arm = await inspect_json(home, "--platform", "linux/arm64", f"{host}/repo:multi")
    assert arm["digest"] == sha256(other_manifest()) and arm["index"] == sha256(index)
    assert arm["platform"] == "linux/arm64" and arm["cmd"] == ["sh"]
    text = (await kura(home, "inspect", "--platform", "linux/arm64", f"{host}/repo:multi")).stdout
    assert f"Index:      {sha256(index)}\n" in text and f"Digest:     {sha256(other_manifest())}\n" in text
    raw = (await kura(home, "inspect", "--raw", "--platform", "linux/arm64", f"{host}/repo:multi")).stdout
    assert raw.rstrip("\n").encode() == other_manifest()

    message = one_line_error(await kura(home, "inspect", "--platform", "linux/s390x", f"{host}/repo:multi"))
    assert "linux/s390x" in message and "linux/amd64" in message and "linux/arm64/v8" in message


async def test_platform_picks_the_image_of_a_stored_index(registry, home):
    host, index = await serve_index(registry)
    assert (await kura(home, "pull", "--quiet", "--all-platforms", f"{host}/repo:multi")).returncode == 0
    arm = await inspect_json(home, "--local", "--platform", "linux/arm64/v8", f"{host}/repo:multi")
    assert arm["digest"] == sha256(other_manifest()) and arm["index"] == sha256(index)
    assert arm["source"] == "local" and arm["platform"] == "linux/arm64"
    whole = await inspect_json(home, "--local", f"{host}/repo:multi")
    assert whole["platforms"] == ["linux/amd64", "linux/arm64/v8"]


async def test_platform_of_a_single_platform_image_must_match(registry, home):
    host, _ = await registry()
    assert (await inspect_json(home, "--platform", "linux/amd64", f"{host}/repo:1"))["platform"] == "linux/amd64"
    message = one_line_error(await kura(home, "inspect", "--platform", "linux/arm64", f"{host}/repo:1"))
    assert message == f"kura: {host}/repo:1 is a single-platform image for linux/amd64, not linux/arm64"
    assert (await kura(home, "pull", "--quiet", f"{host}/repo:1")).returncode == 0
    assert (await kura(home, "tag", f"{host}/repo:1", "mine:1")).returncode == 0
    message = one_line_error(await kura(home, "inspect", "--platform", "linux/arm64", "mine:1"))
    assert message == ("kura: docker.io/library/mine:1 is a single-platform image for linux/amd64, not "
                       "linux/arm64 in the local store; to ask the registry: "
                       "kura inspect --platform linux/arm64 docker.io/library/mine:1")
