"""`kura login`, `kura push`: round trips with Kura (token mode) and the reference registry
(htpasswd), byte-identical pushes, cross-repository mounts, resumed and refused uploads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from registry.auth import htpasswd
from tests.support.layouts import tag_digest
from tests.support.paths import IMAGES, PEER_REGISTRY_SCRIPT, REPO, require_shared
from tests.support.servers import Server, free_port, start_kura, stop

pytestmark = pytest.mark.e2e


def kura(*args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env, input=stdin)



@pytest.fixture
def env(tmp_path):
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {}, "psFormat": "table {{.ID}}"}))
    return dict(os.environ, DOCKER_CONFIG=str(docker), HOME=str(tmp_path), REGISTRY_AUTH_FILE=str(docker / "config.json"))


@pytest.fixture(params=["kura-token", "distribution-htpasswd"])
def secured(request, tmp_path):
    require_shared()
    if request.param == "kura-token":
        root = tmp_path / "kura"
        htpasswd.set_user(root / "auth" / "htpasswd", "alice", "alice-pw", cost=4)
        config = tmp_path / "kura.toml"
        config.write_text('[auth]\nmode = "token"\n')
        server = start_kura(root, None, "--config", str(config))
        yield server
        stop(server)
    else:
        port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        subprocess.run(["bash", str(PEER_REGISTRY_SCRIPT), "--auth", "alice:alice-pw", str(port), str(tmp_path / "d")],
                       check=True, capture_output=True, timeout=60, env=environment)
        yield Server("distribution", f"127.0.0.1:{port}", tmp_path / "d" / "storage")
        subprocess.run(["bash", str(PEER_REGISTRY_SCRIPT), "--stop", str(tmp_path / "d")], capture_output=True)


def test_login_push_pull_round_trip(secured, env, tmp_path):
    host = secured.host
    wrong = kura("login", "-u", "alice", "--password-stdin", host, env=env, stdin="nope\n")
    assert wrong.returncode == 1 and wrong.stderr.startswith("kura: ")
    refused = kura("login", "-u", "alice", "-p", "alice-pw", host, env=env)
    assert refused.returncode == 2 and "--password-stdin" in refused.stderr
    ok = kura("login", "-u", "alice", "--password-stdin", host, env=env, stdin="alice-pw\n")
    assert ok.returncode == 0 and "Login Succeeded" in ok.stdout
    config_path = Path(env["DOCKER_CONFIG"]) / "config.json"
    config = json.loads(config_path.read_text())
    assert config["psFormat"] == "table {{.ID}}"  # other keys kept
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    pushed = kura("push", f"oci:{IMAGES / 'redis'}:7", f"{host}/team/redis:7", "-q", env=env)
    assert pushed.returncode == 0, pushed.stderr
    pulled = kura("pull", f"{host}/team/redis:7", "--store", str(tmp_path / "store"), "-q", env=env)
    assert pulled.returncode == 0, pulled.stderr
    # skopeo uses the very config.json Kura wrote.
    inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"--authfile={config_path}",
                                f"docker://{host}/team/redis:7"], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == tag_digest(IMAGES / "redis", "7")
    assert kura("logout", host, env=env).returncode == 0
    assert host not in json.loads(config_path.read_text()).get("auths", {})
    denied = kura("push", f"oci:{IMAGES / 'redis'}:7", f"{host}/team/redis:8", "-q", env=env)
    assert denied.returncode == 1


@pytest.fixture(scope="module")
def plain_kura(tmp_path_factory):
    require_shared()
    work = tmp_path_factory.mktemp("push")
    server = start_kura(work / "data", None, log=work / "kura.log")
    yield server, work / "kura.log"
    stop(server)


@pytest.mark.parametrize("layout, tag", [("debian", "bookworm"), ("redis", "7"), ("busybox-multiarch", "latest")])
def test_push_is_byte_identical(plain_kura, layout, tag, env, tmp_path):
    server, _ = plain_kura
    result = kura("push", f"oci:{IMAGES / layout}:{tag}", f"{server.host}/same/{layout}:{tag}", "-q", env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                    f"docker://{server.host}/same/{layout}:{tag}", f"oci:{out}:{tag}"], check=True,
                   capture_output=True, timeout=300)
    assert tag_digest(out, tag) == tag_digest(IMAGES / layout, tag)
    for blob in (out / "blobs" / "sha256").iterdir():
        assert blob.read_bytes() == (IMAGES / layout / "blobs" / "sha256" / blob.name).read_bytes()


def test_second_repository_mounts_instead_of_uploading(plain_kura, env):
    server, log = plain_kura
    first = kura("push", f"oci:{IMAGES / 'redis'}:7", f"{server.host}/mount/a:7", env=env)
    assert first.returncode == 0 and "5 uploaded" in first.stdout
    second = kura("push", f"oci:{IMAGES / 'redis'}:7", f"{server.host}/mount/b:7", "--mount-from", "mount/a", env=env)
    assert second.returncode == 0 and "0 uploaded, 5 mounted" in second.stdout, second.stdout + second.stderr
    access = log.read_text()
    assert access.count('"POST /v2/mount/b/blobs/uploads/?mount=sha256') == 5
    assert '"PATCH /v2/mount/b/' not in access and 'PUT /v2/mount/b/blobs/uploads' not in access


def test_copy_within_a_registry_mounts_and_between_registries_uploads(plain_kura, env, tmp_path):
    server, log = plain_kura
    host = server.host
    assert kura("push", f"oci:{IMAGES / 'redis'}:7", f"{host}/copy-src/redis:7", "-q", env=env).returncode == 0
    copied = kura("copy", f"{host}/copy-src/redis:7", f"{host}/copy-dst/redis:7", env=env)
    assert copied.returncode == 0, copied.stderr
    assert "0 uploaded, 5 mounted" in copied.stdout, copied.stdout + copied.stderr
    access = log.read_text()
    assert access.count('"POST /v2/copy-dst/redis/blobs/uploads/?mount=sha256:') == 5
    assert "from=copy-src/redis" in access
    assert '"PATCH /v2/copy-dst/' not in access and '"PUT /v2/copy-dst/redis/blobs/uploads' not in access
    assert not list((server.root / "uploads").iterdir())  # no upload session was opened
    # Another registry has none of the blobs: everything is uploaded there.
    other = start_kura(tmp_path / "other" / "data", None)
    try:
        copied = kura("copy", f"{host}/copy-src/redis:7", f"{other.host}/x/redis:7", env=env)
        assert copied.returncode == 0, copied.stderr
        assert "5 uploaded, 0 mounted" in copied.stdout, copied.stdout
        assert tag_digest(IMAGES / "redis", "7") in copied.stdout
    finally:
        stop(other)


def test_push_mounts_from_where_the_store_saw_the_blobs(plain_kura, env, tmp_path):
    server, log = plain_kura
    store = str(tmp_path / "store")
    assert kura("push", f"oci:{IMAGES / 'redis'}:7", f"{server.host}/seen/a:7", "-q", env=env).returncode == 0
    assert kura("pull", f"{server.host}/seen/a:7", "--store", store, "-q", env=env).returncode == 0
    pushed = kura("push", f"{server.host}/seen/a:7", f"{server.host}/seen/b:7", "--store", store, env=env)
    assert pushed.returncode == 0 and "0 uploaded, 5 mounted" in pushed.stdout, pushed.stdout + pushed.stderr
    assert log.read_text().count('"POST /v2/seen/b/blobs/uploads/?mount=sha256') == 5
    # ...and a push records where it put them, for the next one.
    again = kura("push", f"{server.host}/seen/a:7", f"{server.host}/seen/c:7", "--store", store, env=env)
    assert "5 mounted" in again.stdout


def test_corrupt_local_blob_is_refused_before_anything_is_sent(plain_kura, env, tmp_path):
    server, log = plain_kura
    layout = tmp_path / "layout"
    shutil.copytree(IMAGES / "redis", layout)
    manifest = json.loads((layout / "blobs" / "sha256" / tag_digest(layout, "7")[7:]).read_bytes())
    victim = layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:]
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = log.read_text().count("/v2/corrupt/")
    result = kura("push", f"oci:{layout}:7", f"{server.host}/corrupt/redis:7", env=env)
    assert result.returncode == 1 and "corrupt" in result.stderr and "nothing was sent" in result.stderr
    assert log.read_text().count("/v2/corrupt/") == before == 0


class DroppingProxy:
    """Forwards to a registry, but breaks the second PATCH: either drops the connection in
    the middle of its body (the registry never sees it) or forwards it and drops the answer
    (the registry stored the chunk; the client does not know), or holds it unanswered until
    release() (mode "stall"); mode "refuse" answers every PATCH `status` without forwarding it."""

    def __init__(self, backend: str, mode: str = "request", status: int = 500):
        self.backend, self.port, self.patches, self.mode, self.status = backend, free_port(), 0, mode, status
        self.requests: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path} {request.headers.get('Content-Range', '')}")
        if request.method == "PATCH":
            self.patches += 1
            if self.mode == "refuse" or (self.patches == 2 and self.mode == "stall"):
                await request.read()
                if self.mode == "stall":
                    await self.released.wait()
                status = self.status if self.mode == "refuse" else 500
                return web.json_response({"errors": [{"code": "UNKNOWN", "message": "refused"}]}, status=status)
            if self.patches == 2 and self.mode == "request":
                await request.content.read(1 << 20)
                request.transport.close()  # mid-body, nothing forwarded
                return web.Response(status=500)
        body = await request.read() if request.can_read_body else None
        # Host passes through, so a registry that answers absolute Locations points them at us.
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with self.session.request(request.method, self.backend + request.rel_url.raw_path_qs, data=body,
                                        headers=headers, allow_redirects=False) as upstream:
            if request.method == "PATCH" and self.patches == 2 and self.mode == "response":
                await upstream.read()
                request.transport.close()  # the chunk is stored; its answer never arrives
                return web.Response(status=500)
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={k: v for k, v in upstream.headers.items()
                                         if k.lower() not in ("content-length", "transfer-encoding")})

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            self.released = asyncio.Event()
            self.session = aiohttp.ClientSession()
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self.forward)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        threading.Thread(target=self.run, daemon=True).start()
        self.ready.wait(10)
        return self

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.released.set)

    def __exit__(self, *exc):
        self.release()

        async def close():
            await self.runner.cleanup()
            await self.session.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_push_resumes_after_a_lost_answer_on_the_reference_registry(env, tmp_path):
    """After a lost answer, distribution 2.8 refuses the session (its _state token is one chunk
    behind), so re-sending or asking fails; the client must start one new session, not give up."""
    from tests.support.servers import start_distribution, stop_distribution
    require_shared()
    server = start_distribution(tmp_path / "d")
    try:
        with DroppingProxy(server.url, mode="response") as proxy:
            result = kura("push", f"oci:{IMAGES / 'debian'}:bookworm",
                          f"127.0.0.1:{proxy.port}/resume/debian:bookworm", "-q", env=env)
            assert result.returncode == 0, result.stderr
            posts = [r for r in proxy.requests if r.startswith("POST /v2/resume/debian/blobs/uploads/")]
            assert len(posts) == 3  # config, layer, and one new session for the layer
        pulled = kura("pull", f"{server.host}/resume/debian:bookworm", "--store", str(tmp_path / "s"), "-q", env=env)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        stop_distribution(server)


def test_interrupted_push_resumes(plain_kura, env, tmp_path):
    server, log = plain_kura
    with DroppingProxy(server.url) as proxy:
        result = kura("push", f"oci:{IMAGES / 'debian'}:bookworm", f"127.0.0.1:{proxy.port}/resume/debian:bookworm",
                      "-q", env=env)
        assert result.returncode == 0, result.stderr
        assert proxy.patches >= 4  # 51 MB in 16 MiB chunks, one of them sent twice
    out = tmp_path / "out"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{server.host}/resume/debian:bookworm",
                    f"oci:{out}:bookworm"], check=True, capture_output=True, timeout=300)
    layer = json.loads((IMAGES / "debian" / "blobs" / "sha256" / tag_digest(IMAGES / "debian", "bookworm")[7:])
                       .read_bytes())["layers"][0]["digest"][7:]
    assert hashlib.sha256((out / "blobs" / "sha256" / layer).read_bytes()).hexdigest() == layer
    size = (IMAGES / "debian" / "blobs" / "sha256" / layer).stat().st_size
    lines = log.read_text().splitlines()
    posts = [x for x in lines if '"POST /v2/resume/debian/blobs/uploads/' in x]
    patches = [x for x in lines if '"PATCH /v2/resume/debian/blobs/uploads/' in x]
    # Resumed, not restarted: one session for the layer (and one for the config), and the
    # server received each 16 MiB chunk once; the dropped one never reached it.
    assert len(posts) == 2
    assert len(patches) == -(-size // (16 << 20))


def upload_sessions(server: Server, repository: str) -> list[Path]:
    """The registry's open upload sessions for `repository`."""
    return [d for d in (server.root / "uploads").iterdir()
            if json.loads((d / "info").read_text())["repository"] == repository]


def test_interrupted_push_continues_its_upload_session(plain_kura, env, tmp_path):
    """Ctrl-C in the middle of a layer, then the same push again: it asks the registry where the
    session it left stands and sends only the rest."""
    server, log = plain_kura
    store = str(tmp_path / "store")
    with DroppingProxy(server.url, mode="stall") as proxy:
        target = f"127.0.0.1:{proxy.port}/continued/debian:bookworm"
        first = subprocess.Popen([sys.executable, "-m", "kura", "push", f"oci:{IMAGES / 'debian'}:bookworm", target,
                                  "--store", store, "-q"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while proxy.patches < 2:  # the first chunk is stored; the second hangs
                assert first.poll() is None, first.stderr.read()
                assert time.monotonic() < deadline, "the push never reached its second chunk"
                time.sleep(0.05)
            first.send_signal(signal.SIGINT)
            assert first.wait(30) == 130
            assert first.stderr.read() == "kura: interrupted\n"
        finally:
            if first.poll() is None:
                first.kill()
            first.stderr.close()
        proxy.release()
        second = kura("push", f"oci:{IMAGES / 'debian'}:bookworm", target, "--store", store, "-q", env=env)
        assert second.returncode == 0, second.stderr
        assert not [r for r in proxy.requests if r.startswith("DELETE")]
    layer = json.loads((IMAGES / "debian" / "blobs" / "sha256" / tag_digest(IMAGES / "debian", "bookworm")[7:])
                       .read_bytes())["layers"][0]["digest"][7:]
    size = (IMAGES / "debian" / "blobs" / "sha256" / layer).stat().st_size
    lines = log.read_text().splitlines()
    posts = [x for x in lines if '"POST /v2/continued/debian/blobs/uploads/' in x]
    patches = [x for x in lines if '"PATCH /v2/continued/debian/blobs/uploads/' in x]
    status = [x for x in lines if '"GET /v2/continued/debian/blobs/uploads/' in x]
    assert len(posts) == 2  # config and layer: the second push continued the layer's session
    assert len(patches) == -(-size // (16 << 20))  # every chunk reached the registry once
    assert len(status) == 1
    assert upload_sessions(server, "continued/debian") == []


def test_a_session_the_registry_forgot_is_started_again(plain_kura, env, tmp_path):
    from puller.store import Store
    server, log = plain_kura
    manifest = json.loads((IMAGES / "redis" / "blobs" / "sha256" / tag_digest(IMAGES / "redis", "7")[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    store = Store(tmp_path / "store")
    gone = f"http://{server.host}/v2/forgotten/redis/blobs/uploads/00000000-0000-4000-8000-000000000000"
    store.remember_upload_session(server.host, "forgotten/redis", layer, gone)
    result = kura("push", f"oci:{IMAGES / 'redis'}:7", f"{server.host}/forgotten/redis:7", "--store",
                  str(store.root), "-q", env=env)
    assert result.returncode == 0, result.stderr
    access = log.read_text()
    assert '"GET /v2/forgotten/redis/blobs/uploads/00000000-0000-4000-8000-000000000000 HTTP/1.1" 404' in access
    assert '"DELETE /v2/forgotten/' not in access
    assert access.count('"POST /v2/forgotten/redis/blobs/uploads/ HTTP/1.1" 202') == 5
    assert store.upload_session(server.host, "forgotten/redis", layer) is None


@pytest.mark.parametrize("status", [400, 403, 507])
def test_push_refused_for_good_deletes_its_upload_session_after_one_attempt(plain_kura, env, tmp_path, status):
    """A 4xx (or 507 storage full) is final: no second PATCH, no new session; the session is
    deleted and forgotten."""
    from puller.store import Store
    server, _ = plain_kura
    repository = f"given-up-{status}/debian"
    with DroppingProxy(server.url, mode="refuse", status=status) as proxy:
        result = kura("push", f"oci:{IMAGES / 'debian'}:bookworm", f"127.0.0.1:{proxy.port}/{repository}:bookworm",
                      "--store", str(tmp_path / "store"), "-q", env=env)
        assert result.returncode == 1 and result.stderr.startswith("kura: ") and len(result.stderr.splitlines()) == 1
        assert f"HTTP {status}" in result.stderr
        assert len([r for r in proxy.requests if r.startswith(f"DELETE /v2/{repository}/blobs/uploads/")]) == 1
        assert proxy.patches == 1
        assert len([r for r in proxy.requests if r.startswith(f"POST /v2/{repository}/blobs/uploads/")]) == 2
    assert upload_sessions(server, repository) == []
    assert json.loads((Store(tmp_path / "store").scratch / "uploads.json").read_text()) == {}


def test_push_against_a_failing_registry_keeps_its_session(plain_kura, env, tmp_path):
    """5xx is not a refusal: the push fails, but the session stays (here and there) to continue."""
    from puller.store import Store
    server, _ = plain_kura
    with DroppingProxy(server.url, mode="refuse", status=500) as proxy:
        result = kura("push", f"oci:{IMAGES / 'debian'}:bookworm", f"127.0.0.1:{proxy.port}/kept/debian:bookworm",
                      "--store", str(tmp_path / "store"), "-q", env=env)
        assert result.returncode == 1 and result.stderr.startswith("kura: ") and len(result.stderr.splitlines()) == 1
        assert not [r for r in proxy.requests if r.startswith("DELETE")]
    sessions = upload_sessions(server, "kept/debian")
    assert len(sessions) == 1
    recorded = json.loads((Store(tmp_path / "store").scratch / "uploads.json").read_text())
    assert [v["location"].rsplit("/", 1)[-1].split("?")[0] for v in recorded.values()] == [sessions[0].name]


def test_copy_tag_inspect_tags_delete(plain_kura, env, tmp_path):
    server, _ = plain_kura
    host = server.host
    store = str(tmp_path / "store")
    assert kura("push", f"oci:{IMAGES / 'busybox-multiarch'}:latest", f"{host}/cli/busybox:latest", "-q",
                env=env).returncode == 0
    copied = kura("copy", f"{host}/cli/busybox:latest", f"{host}/cli/mirror:v1", "--all-platforms", "-q", env=env)
    assert copied.returncode == 0, copied.stderr
    info = json.loads(kura("inspect", f"{host}/cli/mirror:v1", "--json", "--store", store, env=env).stdout)
    assert info["digest"] == tag_digest(IMAGES / "busybox-multiarch", "latest")
    assert info["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    raw = kura("inspect", f"{host}/cli/mirror:v1", "--raw", "--store", store, env=env).stdout.rstrip("\n").encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == info["digest"]
    assert kura("copy", f"{host}/cli/busybox:latest", f"oci:{tmp_path / 'layout'}:x", "--platform", "linux/arm64",
                "-q", env=env).returncode == 0
    assert tag_digest(tmp_path / "layout", "x") == tag_digest(IMAGES / "busybox-multiarch", "latest-arm64")
    assert json.loads(kura("tags", f"{host}/cli/mirror", "--json", env=env).stdout) == ["v1"]
    assert kura("pull", f"{host}/cli/mirror:v1", "--store", store, "-q", env=env).returncode == 0
    assert kura("tag", f"{host}/cli/mirror:v1", "mine:1", "--store", store, env=env).returncode == 0
    local = json.loads(kura("inspect", "mine:1", "--json", "--store", store, env=env).stdout)
    assert local["digest"] == tag_digest(IMAGES / "busybox-multiarch", "latest-amd64")
    assert local["cmd"] or local["entrypoint"]
    assert kura("delete", f"{host}/cli/mirror:v1", env=env).returncode == 0
    assert json.loads(kura("tags", f"{host}/cli/mirror", "--json", env=env).stdout) == []
    missing = kura("delete", f"{host}/cli/mirror:v1", env=env)
    assert missing.returncode == 1 and "not found" in missing.stderr


def redis_archives(tmp_path: Path) -> tuple[Path, Path]:
    """The shared redis:7 as skopeo writes it to a docker-archive and to an oci-archive."""
    docker_tar, oci_tar = tmp_path / "redis-docker.tar", tmp_path / "redis-oci.tar"
    for target in (f"docker-archive:{docker_tar}:library/redis:7", f"oci-archive:{oci_tar}:7"):
        subprocess.run(["skopeo", "copy", f"oci:{IMAGES / 'redis'}:7", target], check=True, capture_output=True,
                       timeout=300)
    return docker_tar, oci_tar


def test_push_archives(plain_kura, env, tmp_path):
    """A docker-archive (legacy layout, uncompressed layers) and an oci-archive, as skopeo writes them."""
    server, _ = plain_kura
    docker_tar, oci_tar = redis_archives(tmp_path)
    result = kura("push", f"oci-archive:{oci_tar}:7", f"{server.host}/archives/oci:7", env=env)
    assert result.returncode == 0, result.stderr
    assert tag_digest(IMAGES / "redis", "7") in result.stdout  # the very same manifest
    result = kura("push", f"docker-archive:{docker_tar}", f"{server.host}/archives/docker:7", "-q", env=env)
    assert result.returncode == 0, result.stderr
    source_manifest = json.loads((IMAGES / "redis" / "blobs" / "sha256" / tag_digest(IMAGES / "redis", "7")[7:])
                                 .read_bytes())
    info = json.loads(kura("inspect", f"{server.host}/archives/docker:7", "--json", "--store",
                           str(tmp_path / "s"), env=env).stdout)
    assert info["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    config = json.loads(kura("inspect", f"{server.host}/archives/docker:7", "--config", "--store",
                             str(tmp_path / "s"), env=env).stdout)
    source_config = json.loads((IMAGES / "redis" / "blobs" / "sha256" / source_manifest["config"]["digest"][7:])
                               .read_bytes())
    assert config == source_config
    # Pulling and unpacking checks every layer against the config's diff_ids.
    unpacked = kura("pull", f"{server.host}/archives/docker:7", "--store", str(tmp_path / "s"), "-q",
                    "--unpack", str(tmp_path / "bundle"), env=env)
    assert unpacked.returncode == 0, unpacked.stderr
    assert (tmp_path / "bundle" / "rootfs" / "usr" / "bin" / "redis-server").exists()


def test_copy_from_archives(plain_kura, env, tmp_path):
    """`kura copy docker-archive:FILE DEST` and `oci-archive:FILE[:TAG] DEST`, to a registry or a layout."""
    server, _ = plain_kura
    docker_tar, oci_tar = redis_archives(tmp_path)
    copied = kura("copy", f"oci-archive:{oci_tar}:7", f"{server.host}/copy-archive/oci:7", env=env)
    assert copied.returncode == 0, copied.stderr
    assert tag_digest(IMAGES / "redis", "7") in copied.stdout  # the very same manifest
    copied = kura("copy", f"docker-archive:{docker_tar}", f"{server.host}/copy-archive/docker:7", "-q", env=env)
    assert copied.returncode == 0, copied.stderr
    info = json.loads(kura("inspect", f"{server.host}/copy-archive/docker:7", "--json", "--store",
                           str(tmp_path / "s"), env=env).stdout)
    assert info["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    copied = kura("copy", f"docker-archive:{docker_tar}", f"oci:{tmp_path / 'layout'}:7", "-q", env=env)
    assert copied.returncode == 0, copied.stderr
    assert tag_digest(tmp_path / "layout", "7") == info["digest"]
    missing = kura("copy", f"docker-archive:{tmp_path / 'nope.tar'}", f"{server.host}/copy-archive/x:1", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("kura: ") and "nope.tar" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


def test_two_pushes_from_one_store_do_not_take_over_each_others_session(plain_kura, env, tmp_path):
    """The first push is held in the middle of the layer (its session recorded in the store);
    a second push of the same layer from the same store must not continue that session, which
    the first one still owns: it opens its own, and the first then finishes its own."""
    server, log = plain_kura
    store = str(tmp_path / "store")
    with DroppingProxy(server.url, mode="stall") as proxy:
        first = subprocess.Popen([sys.executable, "-m", "kura", "push", "-v", f"oci:{IMAGES / 'debian'}:bookworm",
                                  f"127.0.0.1:{proxy.port}/twice/debian:a", "--store", store], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while proxy.patches < 2:
                assert first.poll() is None, first.stderr.read()
                assert time.monotonic() < deadline, "the push never reached its second chunk"
                time.sleep(0.05)
            second = kura("push", "-v", f"oci:{IMAGES / 'debian'}:bookworm", f"127.0.0.1:{proxy.port}/twice/debian:b",
                          "--store", store, env=env)
            proxy.release()
            out, err = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    assert second.returncode == 0, second.stderr
    assert first.returncode == 0, err
    assert "continuing the upload" not in second.stderr
    assert "dropped the upload" not in err and "404" not in err
    assert not [r for r in proxy.requests if r.startswith("DELETE")]
    assert upload_sessions(server, "twice/debian") == []


def test_a_push_that_lost_the_registry_continues_its_session_after_a_restart(env, tmp_path):
    """The registry dies in the middle of a layer: the push fails but keeps its session; with the
    registry back (same root, same port) the same push continues that session."""
    require_shared()
    root, port, store = tmp_path / "data", free_port(), str(tmp_path / "store")
    server = start_kura(root, port, log=tmp_path / "kura.log")
    try:
        with DroppingProxy(server.url, mode="stall") as proxy:
            target = f"127.0.0.1:{proxy.port}/restarted/debian:bookworm"
            first = subprocess.Popen([sys.executable, "-m", "kura", "push", f"oci:{IMAGES / 'debian'}:bookworm",
                                      target, "--store", store, "-q"], cwd=REPO, env=env, stderr=subprocess.PIPE,
                                     text=True)
            try:
                deadline = time.monotonic() + 60
                while proxy.patches < 2:
                    assert first.poll() is None, first.stderr.read()
                    assert time.monotonic() < deadline, "the push never reached its second chunk"
                    time.sleep(0.05)
                stop(server, signal.SIGKILL)
                proxy.release()
                assert first.wait(120) == 1
            finally:
                if first.poll() is None:
                    first.kill()
                first.stderr.close()
            server = start_kura(root, port, log=tmp_path / "kura.log")
            second = kura("push", "-v", f"oci:{IMAGES / 'debian'}:bookworm", target, "--store", store, env=env)
            assert second.returncode == 0, second.stderr
            assert "continuing the upload an earlier push left, at byte 16777216" in second.stderr
            assert not [r for r in proxy.requests if r.startswith("DELETE")]
        assert upload_sessions(server, "restarted/debian") == []
    finally:
        stop(server)
