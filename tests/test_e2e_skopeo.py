"""End to end with skopeo 1.9: push, pull, inspect, list tags and delete, against Kura and distribution.

Every test runs once against `kura serve` and once against the reference registry (CNCF distribution,
`docker-registry`), both on loopback over plain HTTP. Pushes are cached per server (module scope) so
the 51 MB debian layer goes up once per server; a test that changes a repository (delete) forgets
that repository's pushes so that any later test pushes it again, whatever the order.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from typing import Callable

import aiohttp
import pytest

from tests.support.client import RegistryClient
from tests.support.layouts import assert_layout_matches, blob_path, file_sha256, tag_digest
from tests.support.paths import IMAGES, require_shared
from tests.support.servers import Server, start_distribution, start_kura, stop, stop_distribution

SKOPEO_TIMEOUT = 300
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# (layout folder under shared/images, tag, copy every platform of an index)
OCI_IMAGES = [
    pytest.param("debian", "bookworm", False, id="debian-bookworm"),
    pytest.param("redis", "7", False, id="redis-7"),
    pytest.param("busybox-multiarch", "latest", True, id="busybox-multiarch-latest"),
]


# ---------------------------------------------------------------- helpers: skopeo and HTTP


def server_log(server: Server) -> str:
    if server.name == "kura":
        candidates = sorted(server.root.parent.glob("kura-*.log"))
    else:
        candidates = [server.extra["workdir"] / "registry.log"]
    lines = []
    for path in candidates:
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()[-30:]
    return "\n".join(lines)


def run_skopeo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, timeout=SKOPEO_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def skopeo_ok(server: Server, *args: str) -> bytes:
    """Run skopeo, assert it exited 0 (showing its stderr and the server's log tail), return stdout."""
    proc = run_skopeo(*args)
    assert proc.returncode == 0, (
        f"skopeo {' '.join(args)} exited {proc.returncode}\n--- stderr:\n"
        f"{proc.stderr.decode(errors='replace')}\n--- {server.name} log tail:\n{server_log(server)}")
    return proc.stdout


def http_get(server: Server, path: str, accept: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(server.url + path, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["kura", "distribution"], ids=["kura", "distribution"])
def server(request, tmp_path_factory):
    require_shared()
    workdir = tmp_path_factory.mktemp(f"skopeo-{request.param}")
    if request.param == "kura":
        srv = start_kura(workdir / "root")
        yield srv
        stop(srv)
    else:
        srv = start_distribution(workdir / "distribution")
        yield srv
        stop_distribution(srv)


class Pushes:
    """What has been pushed to one server; each push happens at most once until forgotten."""

    def __init__(self, server: Server):
        self.server = server
        self.done: set[tuple[str, str]] = set()

    def ensure(self, repo: str, tag: str, push: Callable[[], None]) -> None:
        if (repo, tag) not in self.done:
            push()
            self.done.add((repo, tag))

    def forget(self, repo: str) -> None:
        self.done = {key for key in self.done if key[0] != repo}

    def oci(self, layout: str, tag: str, all_images: bool = False) -> str:
        """`skopeo copy --preserve-digests oci:<layout>:<tag> docker://HOST/library/<layout>:<tag>`."""
        repo = f"library/{layout}"

        def push() -> None:
            skopeo_ok(self.server, "copy", "--preserve-digests", "--dest-tls-verify=false",
                      *(["--all"] if all_images else []),
                      f"oci:{IMAGES / layout}:{tag}", f"docker://{self.server.host}/{repo}:{tag}")

        self.ensure(repo, tag, push)
        return repo

    def layout_with_client(self, layout: str, tag: str) -> str:
        """Push with the test client (for layouts skopeo's oci: transport cannot read)."""
        repo = f"library/{layout}"

        async def push_async() -> str:
            async with aiohttp.ClientSession() as session:
                return await RegistryClient(session, self.server.url).push_layout(IMAGES / layout, repo, tag)

        def push() -> None:
            digest = asyncio.run(push_async())
            assert digest == tag_digest(IMAGES / layout, tag)

        self.ensure(repo, tag, push)
        return repo


@pytest.fixture(scope="module")
def pushes(server) -> Pushes:
    return Pushes(server)


# ---------------------------------------------------------------- tests


@pytest.mark.e2e
@pytest.mark.parametrize("layout, tag, all_images", OCI_IMAGES)
def test_push_then_pull_round_trip(server, pushes, tmp_path, layout, tag, all_images):
    repo = pushes.oci(layout, tag, all_images)
    destination = tmp_path / layout
    skopeo_ok(server, "copy", "--src-tls-verify=false", *(["--all"] if all_images else []),
              f"docker://{server.host}/{repo}:{tag}", f"oci:{destination}:{tag}")
    assert_layout_matches(IMAGES / layout, destination, tag)


@pytest.mark.e2e
@pytest.mark.parametrize("layout, tag, all_images", OCI_IMAGES)
def test_inspect(server, pushes, layout, tag, all_images):
    repo = pushes.oci(layout, tag, all_images)
    out = skopeo_ok(server, "inspect", "--tls-verify=false", f"docker://{server.host}/{repo}:{tag}")
    info = json.loads(out)
    assert info["Digest"] == tag_digest(IMAGES / layout, tag)
    assert tag in info["RepoTags"]
    assert info["Name"] == f"{server.host}/{repo}"


@pytest.mark.e2e
@pytest.mark.parametrize("layout, tag, all_images", OCI_IMAGES)
def test_inspect_raw_is_byte_identical(server, pushes, layout, tag, all_images):
    repo = pushes.oci(layout, tag, all_images)
    digest = tag_digest(IMAGES / layout, tag)
    source = blob_path(IMAGES / layout, digest).read_bytes()
    by_tag = skopeo_ok(server, "inspect", "--raw", "--tls-verify=false", f"docker://{server.host}/{repo}:{tag}")
    assert by_tag == source
    by_digest = skopeo_ok(server, "inspect", "--raw", "--tls-verify=false",
                          f"docker://{server.host}/{repo}@{digest}")
    assert by_digest == source


@pytest.mark.e2e
def test_docker_manifest_list_round_trip(server, pushes, tmp_path):
    layout, tag = "busybox-multiarch-docker", "latest"
    source = IMAGES / layout
    digest = tag_digest(source, tag)
    source_list = blob_path(source, digest).read_bytes()
    assert json.loads(source_list)["mediaType"] == DOCKER_LIST
    repo = pushes.layout_with_client(layout, tag)
    reference = f"docker://{server.host}/{repo}:{tag}"

    # The media type survived the round trip through the registry, and so did the bytes.
    status, headers, body = http_get(server, f"/v2/{repo}/manifests/{tag}",
                                     f"{DOCKER_LIST}, {DOCKER_MANIFEST}, {OCI_INDEX}, {OCI_MANIFEST}")
    assert status == 200
    assert headers["Content-Type"] == DOCKER_LIST
    assert headers["Docker-Content-Digest"] == digest
    assert body == source_list

    assert skopeo_ok(server, "inspect", "--raw", "--tls-verify=false", reference) == source_list
    info = json.loads(skopeo_ok(server, "inspect", "--tls-verify=false", reference))
    assert info["Digest"] == digest and tag in info["RepoTags"]

    # Pulled into an OCI layout unchanged: `--format v2s2` keeps skopeo from converting the Docker
    # manifests to OCI ones (which it otherwise does when writing to oci:), and --preserve-digests
    # makes it fail rather than rewrite anything.
    destination = tmp_path / layout
    skopeo_ok(server, "copy", "--all", "--format", "v2s2", "--preserve-digests", "--src-tls-verify=false",
              reference, f"oci:{destination}:{tag}")
    assert_layout_matches(source, destination, tag)
    written = json.loads((destination / "index.json").read_text())["manifests"][0]
    assert written["mediaType"] == DOCKER_LIST


@pytest.mark.e2e
def test_docker_manifest_list_plain_copy_to_oci(server, pushes, tmp_path):
    """Plain `skopeo copy --all docker://… oci:…`: skopeo converts to OCI, the layers stay identical."""
    layout, tag = "busybox-multiarch-docker", "latest"
    source = IMAGES / layout
    repo = pushes.layout_with_client(layout, tag)
    destination = tmp_path / layout
    skopeo_ok(server, "copy", "--all", "--src-tls-verify=false",
              f"docker://{server.host}/{repo}:{tag}", f"oci:{destination}:{tag}")
    index_digest = tag_digest(destination, tag)
    index = json.loads(blob_path(destination, index_digest).read_bytes())
    assert len(index["manifests"]) == 2
    source_list = json.loads(blob_path(source, tag_digest(source, tag)).read_bytes())
    source_layers = set()
    for child in source_list["manifests"]:
        manifest = json.loads(blob_path(source, child["digest"]).read_bytes())
        source_layers |= {layer["digest"] for layer in manifest["layers"]}
    copied_layers = set()
    for child in index["manifests"]:
        manifest = json.loads(blob_path(destination, child["digest"]).read_bytes())
        copied_layers |= {layer["digest"] for layer in manifest["layers"]}
    assert copied_layers == source_layers
    for layer in copied_layers:
        assert file_sha256(blob_path(destination, layer)) == file_sha256(blob_path(source, layer))


@pytest.mark.e2e
def test_list_tags(server, pushes):
    repo = pushes.oci("redis", "7")
    pushes.oci("redis", "latest")
    info = json.loads(skopeo_ok(server, "list-tags", "--tls-verify=false", f"docker://{server.host}/{repo}"))
    assert info["Repository"] == f"{server.host}/{repo}"
    assert sorted(info["Tags"]) == ["7", "latest"]
    # Both tags name the same manifest.
    digests = {json.loads(skopeo_ok(server, "inspect", "--tls-verify=false",
                                    f"docker://{server.host}/{repo}:{t}"))["Digest"] for t in ("7", "latest")}
    assert digests == {tag_digest(IMAGES / "redis", "7")}


@pytest.mark.e2e
def test_delete(server, pushes):
    repo = pushes.oci("redis", "7")
    pushes.oci("redis", "latest")
    digest = tag_digest(IMAGES / "redis", "latest")
    base = f"docker://{server.host}/{repo}"
    try:
        skopeo_ok(server, "delete", "--tls-verify=false", f"{base}:latest")

        # skopeo resolves the tag and deletes the manifest by digest (DELETE /v2/<name>/manifests/<digest>),
        # so on both registries the manifest goes, and with it every tag naming it: "7" too.
        for reference in (f"{base}:latest", f"{base}@{digest}", f"{base}:7"):
            proc = run_skopeo("inspect", "--tls-verify=false", reference)
            assert proc.returncode != 0, f"{reference} still resolves: {proc.stdout[:500]!r}"
            stderr = proc.stderr.decode(errors="replace")
            assert "manifest unknown" in stderr.lower(), stderr

        # The repository itself remains, with no tags.
        info = json.loads(skopeo_ok(server, "list-tags", "--tls-verify=false", base))
        assert info["Tags"] == []
    finally:
        pushes.forget(repo)  # later tests push redis again


@pytest.mark.e2e
def test_delete_unknown_tag_fails(server, pushes):
    repo = pushes.oci("busybox-multiarch", "latest", all_images=True)
    proc = run_skopeo("delete", "--tls-verify=false", f"docker://{server.host}/{repo}:no-such-tag")
    assert proc.returncode != 0
    # Nothing else was touched.
    out = skopeo_ok(server, "inspect", "--raw", "--tls-verify=false", f"docker://{server.host}/{repo}:latest")
    source = IMAGES / "busybox-multiarch"
    assert out == blob_path(source, tag_digest(source, "latest")).read_bytes()
