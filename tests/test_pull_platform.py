"""`--platform` against a single-platform image: asked for explicitly, it must fit (as containerd
normalises platforms); not asked for, whatever the image is gets pulled, as before."""

from __future__ import annotations

import json
import os

import pytest

from puller import platform as platforms
from puller.platform import Platform
from puller.store import Store
from tests.support.cli import run_kura
from tests.support.faulty_registry import Faults, image, index_of, make_app, sha256

LAYER = os.urandom(64 * 1024)
ARM64_CONFIG = b'{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


@pytest.mark.parametrize("wanted, image, expected", [
    ("linux/arm64/v8", "linux/arm64", True),
    ("linux/arm64", "linux/arm64/v8", True),
    ("linux/aarch64", "linux/arm64", True),
    ("linux/amd64", "linux/x86_64", True),
    ("linux/amd64/v1", "linux/amd64", True),
    ("linux/arm/v7", "linux/arm", True),       # arm without a variant is v7
    ("linux/arm/v6", "linux/arm", False),
    ("linux/arm64/v8", "linux/amd64", False),
    ("windows/amd64", "linux/amd64", False),
    ("linux/386", "linux/i386", True),
])
def test_platforms_compare_normalised(wanted, image, expected):
    assert platforms.fits(Platform.parse(image), Platform.parse(wanted)) is expected


def test_normalise_names_the_canonical_form():
    assert str(platforms.normalise(Platform.parse("linux/aarch64/8"))) == "linux/arm64"
    assert str(platforms.normalise(Platform.parse("linux/armhf"))) == "linux/arm/v7"


async def test_pull_with_another_platform_is_refused_and_stores_nothing(aiohttp_server, tmp_path):
    faults = Faults()
    server = await aiohttp_server(make_app(LAYER, faults))
    reference = f"127.0.0.1:{server.port}/app:v1"
    store = tmp_path / "store"
    ran = await run_kura("pull", reference, "--platform", "linux/arm64/v8", "--store", str(store), "-q")
    assert ran.returncode == 1
    assert ran.stderr == f"kura: {reference} is linux/amd64 only; asked for linux/arm64/v8\n"
    assert Store(store).images() == []
    assert not [r for r in faults.requests if r.startswith(f"GET blob {sha256(LAYER)[:15]}")]
    # The platform it offers is fine, written either way.
    for platform in ("linux/amd64", "linux/x86_64"):
        ran = await run_kura("pull", reference, "--platform", platform, "--store", str(store), "-q")
        assert ran.returncode == 0, ran.stderr
    assert [i.reference for i in Store(store).images()] == [reference]
    # The config read for the check is the one stored: fetched once, counted as downloaded.
    faults.requests.clear()
    ran = await run_kura("pull", reference, "--platform", "linux/amd64", "--store", str(tmp_path / "other"))
    assert "(2 downloaded, 0 already stored)" in ran.stdout, ran.stdout + ran.stderr
    assert len([r for r in faults.requests if r.startswith("GET blob")]) == 2


async def test_single_image_without_platform_is_pulled_whatever_it_is(aiohttp_server, tmp_path):
    server = await aiohttp_server(make_app(LAYER, Faults(config=ARM64_CONFIG)))
    reference = f"127.0.0.1:{server.port}/app:v1"
    ran = await run_kura("pull", reference, "--store", str(tmp_path / "store"), "-q")
    assert ran.returncode == 0, ran.stderr
    ran = await run_kura("pull", reference, "--platform", "linux/arm64/v8", "--store", str(tmp_path / "s2"), "-q")
    assert ran.returncode == 0, ran.stderr
    refused = await run_kura("pull", reference, "--platform", "linux/amd64", "--store", str(tmp_path / "s3"), "-q")
    assert refused.stderr == f"kura: {reference} is linux/arm64 only; asked for linux/amd64\n"


async def test_copy_with_another_platform_is_refused(aiohttp_server, tmp_path):
    server = await aiohttp_server(make_app(LAYER, Faults()))
    reference = f"127.0.0.1:{server.port}/app:v1"
    out = tmp_path / "layout"
    ran = await run_kura("copy", reference, f"oci:{out}:x", "--platform", "linux/arm64", "-q")
    assert ran.returncode == 1
    assert ran.stderr == f"kura: {reference} is linux/amd64 only; asked for linux/arm64\n"
    assert not out.exists()
    ran = await run_kura("copy", reference, f"oci:{out}:x", "--platform", "linux/amd64", "-q")
    assert ran.returncode == 0, ran.stderr


def config_for(platform: str) -> bytes:
    p = Platform.parse(platform)
    return json.dumps({"os": p.os, "architecture": p.architecture, **({"variant": p.variant} if p.variant else {}),
                       "rootfs": {"type": "layers", "diff_ids": []}}).encode()


# One comparison everywhere: pulling a single image, choosing from an index (pull and inspect),
# and inspecting a single image all agree on every spelling.
@pytest.mark.parametrize("offered, wanted, fits", [
    ("linux/arm/v6", "linux/arm", False),   # linux/arm is arm/v7
    ("linux/arm", "linux/arm/v7", True),
    ("linux/x86_64", "linux/amd64", True),
    ("linux/aarch64", "linux/arm64", True),
    ("linux/arm64/v8", "linux/arm64", True),
    ("linux/amd64", "linux/arm64", False),
])
async def test_every_platform_check_agrees(offered, wanted, fits, aiohttp_server, tmp_path):
    config = config_for(offered)
    manifest = image(LAYER, config=config)[0]
    p = Platform.parse(offered)
    index = index_of((manifest, {"os": p.os, "architecture": p.architecture,
                                 **({"variant": p.variant} if p.variant else {})}))
    faults = Faults(config=config, manifests={"multi": index, sha256(manifest): manifest})
    server = await aiohttp_server(make_app(LAYER, faults))
    host = f"127.0.0.1:{server.port}"
    for n, (command, reference) in enumerate([("pull", "app:v1"), ("pull", "app:multi"),
                                              ("inspect", "app:v1"), ("inspect", "app:multi")]):
        extra = ("--store", str(tmp_path / f"store{n}"), "-q") if command == "pull" else ()
        ran = await run_kura(command, f"{host}/{reference}", "--platform", wanted, *extra)
        assert (ran.returncode == 0) is fits, (command, reference, ran.stderr)
