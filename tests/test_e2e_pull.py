"""`kura pull` end to end: from Kura and from the reference registry, and from a loopback
"Docker Hub" (token auth on a separate realm, library/ namespace, an index with an
attestation manifest, a Docker manifest list) reached through registries.conf."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from registry.auth import htpasswd
from tests.support.client import RegistryClient
from tests.support.layouts import tag_digest
from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import start_distribution, start_kura, stop, stop_distribution

pytestmark = pytest.mark.e2e

SOURCES = [("debian", "bookworm", "library/debian"), ("redis", "7", "library/redis"),
           ("busybox-multiarch", "latest", "library/busybox")]



def kura(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def skopeo(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module", params=["kura", "distribution"])
def registry(request, tmp_path_factory):
    require_shared()
    work = tmp_path_factory.mktemp(request.param)
    server = start_kura(work / "data") if request.param == "kura" else start_distribution(work)
    for layout, tag, repo in SOURCES:
        skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{IMAGES / layout}:{tag}",
               f"docker://{server.host}/{repo}:{tag}")
    yield server
    stop(server) if request.param == "kura" else stop_distribution(server)


@pytest.fixture
def client_env(tmp_path):
    """No ambient Docker credentials or registries.conf."""
    (tmp_path / "docker").mkdir()
    return dict(os.environ, DOCKER_CONFIG=str(tmp_path / "docker"), HOME=str(tmp_path),
                XDG_DATA_HOME=str(tmp_path / "xdg"))


@pytest.mark.parametrize("layout, tag, repo", SOURCES, ids=[s[0] for s in SOURCES])
def test_pull_with_oci_output(registry, layout, tag, repo, tmp_path, client_env):
    out = tmp_path / "out"
    result = kura("pull", f"{registry.host}/{repo}:{tag}", "--store", str(tmp_path / "store"), "--platform",
                  "linux/amd64", "--output", f"oci:{out}:{tag}", "--quiet", env=client_env)
    assert result.returncode == 0, result.stderr
    expected = tag_digest(IMAGES / layout, tag)
    if layout == "busybox-multiarch":  # the amd64 entry of the index
        expected = tag_digest(IMAGES / layout, "latest-amd64")
    inspected = json.loads(skopeo("inspect", f"oci:{out}:{tag}").stdout)
    assert inspected["Digest"] == expected
    umoci = subprocess.run(["umoci", "stat", "--image", f"{out}:{tag}"], capture_output=True, text=True, timeout=120)
    assert umoci.returncode == 0, umoci.stderr
    for blob in (out / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    images = json.loads(kura("images", "--json", "--store", str(tmp_path / "store"), env=client_env).stdout)
    assert [(i["reference"], i["digest"]) for i in images] == [(f"{registry.host}/{repo}:{tag}", expected)]


def test_docker_archive_output(registry, tmp_path, client_env):
    archive = tmp_path / "redis.tar"
    result = kura("pull", f"{registry.host}/library/redis:7", "--store", str(tmp_path / "store"), "-q",
                  "--output", f"docker-archive:{archive}", env=client_env)
    assert result.returncode == 0, result.stderr
    import tarfile
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == [f"{registry.host}/library/redis:7"]
    source = json.loads((IMAGES / "redis" / "blobs" / "sha256" / tag_digest(IMAGES / "redis", "7")[7:]).read_bytes())
    assert manifest[0]["Config"] == source["config"]["digest"][7:] + ".json"
    config = json.loads((IMAGES / "redis" / "blobs" / "sha256" / source["config"]["digest"][7:]).read_bytes())
    assert [layer.split("/")[0] for layer in manifest[0]["Layers"]] == [d[7:] for d in config["rootfs"]["diff_ids"]]
    # skopeo reads it back, with the image config byte for byte, and can copy it out.
    raw_config = subprocess.run(["skopeo", "inspect", "--raw", "--config", f"docker-archive:{archive}"],
                                capture_output=True, timeout=120).stdout
    assert hashlib.sha256(raw_config).hexdigest() == source["config"]["digest"][7:]
    skopeo("copy", f"docker-archive:{archive}", f"oci:{tmp_path / 'back'}:7")


def test_all_platforms_and_rmi(registry, tmp_path, client_env):
    store = str(tmp_path / "store")
    result = kura("pull", f"{registry.host}/library/busybox", "--all-platforms", "--store", store, env=client_env)
    assert result.returncode == 0, result.stderr
    stored = {p.name for p in (tmp_path / "store" / "blobs" / "sha256").iterdir()}
    assert tag_digest(IMAGES / "busybox-multiarch", "latest")[7:] in stored
    assert tag_digest(IMAGES / "busybox-multiarch", "latest-arm64")[7:] in stored
    assert kura("pull", f"{registry.host}/library/redis:7", "--store", store, "-q", env=client_env).returncode == 0
    removed = kura("rmi", f"{registry.host}/library/busybox", "--store", store, env=client_env)
    assert removed.returncode == 0, removed.stderr
    left = {p.name for p in (tmp_path / "store" / "blobs" / "sha256").iterdir()}
    assert tag_digest(IMAGES / "redis", "7")[7:] in left
    assert not left & ({p.name for p in (IMAGES / "busybox-multiarch" / "blobs" / "sha256").iterdir()} - {
        p.name for p in (IMAGES / "redis" / "blobs" / "sha256").iterdir()})


def test_concurrent_pulls_into_one_store(registry, tmp_path, client_env):
    store = str(tmp_path / "store")
    processes = [subprocess.Popen([sys.executable, "-m", "kura", "pull", f"{registry.host}/{repo}:{tag}",
                                   "--store", store, "-q", "--platform", "linux/amd64"],
                                  cwd=REPO, env=client_env, stderr=subprocess.PIPE, text=True)
                 for _, tag, repo in SOURCES * 2]
    for p in processes:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    images = json.loads(kura("images", "--json", "--store", store, env=client_env).stdout)
    assert sorted(i["reference"] for i in images) == sorted(f"{registry.host}/{r}:{t}" for _, t, r in SOURCES)
    assert not list((tmp_path / "store" / ".kura").glob("*.partial"))


# ---------------------------------------------------------------- the loopback Docker Hub

HUB_ISSUER = """
[auth]
mode = "token"
[[auth.rules]]
repositories = ["library/**"]
anonymous = true
actions = ["pull"]
[[auth.rules]]
repositories = ["**"]
users = ["hubadmin"]
actions = ["*"]
"""


def attested_busybox(tmp_path: Path) -> Path:
    """The shared busybox index plus an attestation manifest (unknown/unknown), as Docker Hub has."""
    layout = tmp_path / "busybox-attested"
    shutil.copytree(IMAGES / "busybox-multiarch", layout)
    blobs = layout / "blobs" / "sha256"

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    statement = put(b'{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document"}')
    config = put(b"{}")
    attestation = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                              "layers": [{"mediaType": "application/vnd.in-toto+json", **statement}]}).encode()
    index_digest = tag_digest(layout, "latest")
    index = json.loads((blobs / index_digest[7:]).read_bytes())
    amd64 = next(m for m in index["manifests"] if m["platform"]["architecture"] == "amd64")
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(attestation),
                               "platform": {"architecture": "unknown", "os": "unknown"},
                               "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                               "vnd.docker.reference.digest": amd64["digest"]}})
    new_index = put(json.dumps(index).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", **new_index,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return layout


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    require_shared()
    work = tmp_path_factory.mktemp("hub")
    htpasswd.set_user(work / "issuer" / "auth" / "htpasswd", "hubadmin", "hub-admin-pw", cost=4)
    (work / "issuer.toml").write_text(HUB_ISSUER)
    issuer = start_kura(work / "issuer", None, "--config", str(work / "issuer.toml"))
    (work / "registry.toml").write_text(f"""
[auth]
mode = "token"
[auth.external]
realm = "{issuer.url}/auth/token"
service = "kura"
issuer = "kura"
certificate = "{work / 'issuer' / 'auth' / 'token-signing.crt'}"
""")
    registry = start_kura(work / "registry", None, "--config", str(work / "registry.toml"))
    authfile = work / "auth.json"
    authfile.write_text(json.dumps({"auths": {registry.host: {
        "auth": base64.b64encode(b"hubadmin:hub-admin-pw").decode()}}}))
    for layout, tag, repo in [("debian", "bookworm", "library/debian"), ("redis", "7", "library/redis"),
                              ("redis", "latest", "library/redis")]:
        skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"--dest-authfile={authfile}",
               f"oci:{IMAGES / layout}:{tag}", f"docker://{registry.host}/{repo}:{tag}")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"--dest-authfile={authfile}",
           f"oci:{attested_busybox(work)}:latest", f"docker://{registry.host}/library/busybox:latest")
    asyncio.run(push_docker_list(issuer.url, registry.url))
    conf = work / "registries.conf"
    conf.write_text(f'[[registry]]\nprefix = "docker.io"\nlocation = "{registry.host}"\ninsecure = true\n')
    yield {"registry": registry, "conf": conf}
    stop(registry)
    stop(issuer)


async def push_docker_list(issuer_url: str, registry_url: str) -> None:
    basic = base64.b64encode(b"hubadmin:hub-admin-pw").decode()
    request = urllib.request.Request(f"{issuer_url}/auth/token?service=kura&scope=repository:library/busybox:pull,push",
                                     headers={"Authorization": f"Basic {basic}"})
    token = json.loads(urllib.request.urlopen(request).read())["token"]
    layout = IMAGES / "busybox-multiarch-docker"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        await RegistryClient(session, registry_url).push_layout_manifest(
            layout, "library/busybox", tag_digest(layout, "latest"), "docker")


@pytest.mark.parametrize("reference, layout, tag", [
    ("redis", "redis", "latest"), ("debian:bookworm", "debian", "bookworm"),
    ("busybox:docker", "busybox-multiarch-docker", None),
])
def test_pull_from_loopback_hub(hub, reference, layout, tag, tmp_path, client_env):
    store = tmp_path / "store"
    result = kura("pull", reference, "--registries-conf", str(hub["conf"]), "--store", str(store),
                  "--platform", "linux/amd64", env=client_env)
    assert result.returncode == 0, result.stderr
    images = json.loads(kura("images", "--json", "--store", str(store), env=client_env).stdout)
    name = f"docker.io/library/{reference if ':' in reference else reference + ':latest'}"
    assert [i["reference"] for i in images] == [name]
    if tag is not None:
        assert images[0]["digest"] == tag_digest(IMAGES / layout, tag)
    else:  # the amd64 schema 2 manifest listed in the Docker manifest list
        docker_list = json.loads((IMAGES / layout / "blobs" / "sha256" /
                                  tag_digest(IMAGES / layout, "latest")[7:]).read_bytes())
        amd64 = next(m for m in docker_list["manifests"] if m["platform"]["architecture"] == "amd64")
        assert images[0]["digest"] == amd64["digest"]
        assert images[0]["platform"] == "linux/amd64"


def test_hub_index_with_attestation_picks_the_platform(hub, tmp_path, client_env):
    store = tmp_path / "store"
    result = kura("pull", "busybox", "--registries-conf", str(hub["conf"]), "--store", str(store),
                  "--platform", "linux/arm64", "-q", env=client_env)
    assert result.returncode == 0, result.stderr
    images = json.loads(kura("images", "--json", "--store", str(store), env=client_env).stdout)
    assert images[0]["digest"] == tag_digest(IMAGES / "busybox-multiarch", "latest-arm64")
    assert images[0]["platform"] == "linux/arm64/v8"
    missing = kura("pull", "busybox", "--registries-conf", str(hub["conf"]), "--store", str(store),
                   "--platform", "linux/riscv64", env=client_env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("kura: no image for platform linux/riscv64; "
                                      "available: linux/amd64, linux/arm64/v8")


def test_hub_refuses_anonymous_pull_outside_library(hub, tmp_path, client_env):
    result = kura("pull", "someone/private", "--registries-conf", str(hub["conf"]), "--store",
                  str(tmp_path / "store"), env=client_env)
    assert result.returncode == 1
    assert result.stderr.startswith("kura: ") and len(result.stderr.strip().splitlines()) == 1


def test_copy_from_the_hub_into_a_private_registry(hub, tmp_path, client_env):
    """The README's mirroring example: kura copy docker.io/library/redis:latest localhost:PORT/redis:latest."""
    private = start_kura(tmp_path / "private")
    try:
        copied = kura("copy", "docker.io/library/redis:latest", f"{private.host}/redis:latest",
                      "--registries-conf", str(hub["conf"]), "-q", env=client_env)
        assert copied.returncode == 0, copied.stderr
        pulled = kura("pull", f"{private.host}/redis", "--store", str(tmp_path / "store"), "-q", env=client_env)
        assert pulled.returncode == 0, pulled.stderr
        images = json.loads(kura("images", "--json", "--store", str(tmp_path / "store"), env=client_env).stdout)
        assert images[0]["digest"] == tag_digest(IMAGES / "redis", "latest")
    finally:
        stop(private)
