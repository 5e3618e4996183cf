"""Scale out: several stateless `kura serve` instances over one shared store, behind real load
balancers (haproxy and nginx, round-robin, no stickiness).

Any instance must serve any request: a chunked upload hops between instances, a client whose
instance died carries on with another, skopeo pushes and pulls every shared image through the
balancers byte for byte, and instances SIGKILLed at random while pushes are in flight leave a
store that fsck finds clean, with every acknowledged push intact.

The tests know the store only as the TOML storage part of the instances' shared config: see
STORE_FLAVOURS below, the one place to add another kind of shared store (S3)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.support import kura_s3
from tests.support.balancer import BACKEND_HEADER, Balancer, start as start_balancer
from tests.support.client import RegistryClient, sha256
from tests.support.instances import Instances, start_instances
from tests.support.layouts import assert_layout_matches, blob_path, tag_digest, write_layout
from tests.support.paths import IMAGES, REPO, require_shared

pytestmark = pytest.mark.e2e

INSTANCES = 3
SKOPEO_TIMEOUT = 300
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


# ---------------------------------------------------------------- the shared store
#
# A flavour is a context manager that gets a scratch folder, sets up whatever the store needs
# for the whole module (nothing for a directory; a SeaweedFS server for S3), and yields a
# function that returns the storage part of the instances' config for a fresh, empty store
# with the given name. Everything else in this module works unchanged on any flavour.
#
# To add S3: write `s3_store(folder)` (start SeaweedFS, e.g. from tests/support/seaweedfs.py,
# yield `lambda name: f'[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = ...\nbucket = ...\n'
# f'prefix = "{name}"\n...'`, stop it after) and add `"s3": s3_store` to STORE_FLAVOURS.
# `kura fsck --config` reads the same file, so the checks follow.


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


@contextlib.contextmanager
def filesystem_store(folder: Path, request) -> Iterator[Callable[[str], str]]:
    yield lambda name: f"[storage]\nroot = {toml_string(str(folder / name))}\n"


@contextlib.contextmanager
def s3_store(folder: Path, request) -> Iterator[Callable[[str], str]]:
    """A prefix per store in this module's bucket on the session's SeaweedFS (tests/conftest.py)."""
    bucket = request.getfixturevalue("s3_bucket")
    yield lambda name: kura_s3.storage_toml(bucket, root=folder / name, prefix=name)


STORE_FLAVOURS: dict[str, Callable[..., contextlib.AbstractContextManager[Callable[[str], str]]]] = {
    "filesystem": filesystem_store,
    "s3": s3_store,
}


@pytest.fixture(scope="module", params=sorted(STORE_FLAVOURS))
def shared_store(request, tmp_path_factory) -> Iterator[Callable[[str], str]]:
    with STORE_FLAVOURS[request.param](tmp_path_factory.mktemp(f"store-{request.param}"), request) as new_store:
        yield new_store


# ---------------------------------------------------------------- a cluster


@dataclass
class Cluster:
    instances: Instances
    balancers: dict[str, Balancer] = field(default_factory=dict)

    @property
    def bases(self) -> list[str]:
        return [instance.url for instance in self.instances]

    def kill(self, index: int) -> None:
        self.instances.kill(index)

    def restart(self, index: int) -> None:
        """Start instance `index` again and wait until every balancer sends it requests."""
        self.instances.restart(index)
        for balancer in self.balancers.values():
            deadline = time.monotonic() + 15
            while True:
                status, headers, _ = http_request("GET", balancer.url + "/v2/")
                if status == 200 and balancer.backend_index(headers[BACKEND_HEADER]) == index:
                    break
                assert time.monotonic() < deadline, f"{balancer.kind} never went back to instance {index}"
                time.sleep(0.05)

    def ensure_all_running(self) -> None:
        for instance in self.instances:
            if not instance.alive:
                self.restart(instance.index)

    def logs(self) -> str:
        parts = [self.instances.log_tail()]
        parts += [balancer.log_tail() for balancer in self.balancers.values()]
        return "\n".join(parts)

    def assert_fsck_clean(self) -> None:
        result = self.instances.fsck()
        assert result.returncode == 0 and result.stdout.rstrip().endswith(": ok"), (
            f"kura fsck exited {result.returncode}\n{result.stdout}{result.stderr}")

    def stop(self) -> None:
        for balancer in self.balancers.values():
            balancer.stop()
        self.instances.stop_all()


@contextlib.contextmanager
def running_cluster(folder: Path, storage_toml: str, balancers=("haproxy", "nginx"),
                    extra_toml: str = "") -> Iterator[Cluster]:
    cluster = Cluster(start_instances(folder / "instances", storage_toml, INSTANCES, extra_toml))
    try:
        for kind in balancers:
            cluster.balancers[kind] = start_balancer(kind, folder / kind, cluster.instances.ports)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(shared_store, tmp_path_factory) -> Iterator[Cluster]:
    """Three instances over one store, haproxy and nginx in front of them. Tests that kill an
    instance start it again; at the end the store must pass fsck."""
    require_shared()
    with running_cluster(tmp_path_factory.mktemp("cluster"), shared_store("main")) as cluster:
        yield cluster
        cluster.ensure_all_running()
        cluster.assert_fsck_clean()


@pytest.fixture
def alive(cluster) -> Iterator[Cluster]:
    """The cluster with every instance running before and after the test."""
    cluster.ensure_all_running()
    yield cluster
    cluster.ensure_all_running()


# ---------------------------------------------------------------- HTTP helpers


def http_request(method: str, url: str) -> tuple[int, Message, bytes]:
    """(status, headers looked up case-insensitively, body)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@dataclass
class Answer:
    status: int
    headers: CIMultiDict  # haproxy sends header names in lower case
    body: bytes


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> Answer:
    async with session.request(method, url, allow_redirects=False, **kwargs) as response:
        return Answer(response.status, CIMultiDict(response.headers), await response.read())


def upload_end(answer: Answer) -> int:
    """The offset after the last byte stored, from an upload's `Range: 0-<last>` header."""
    start, _, last = answer.headers["Range"].partition("-")
    assert start == "0", answer.headers
    return int(last) + 1


async def patch(session, url: str, chunk: bytes, offset: int, *, trickle: bool = False) -> Answer:
    """PATCH `chunk` at `offset`; with `trickle`, sent slowly in pieces (chunked encoding), so
    that the request is still arriving when an instance is killed."""
    async def pieces():
        for start in range(0, len(chunk), 64 * 1024):
            yield chunk[start:start + 64 * 1024]
            await asyncio.sleep(0.005)
    return await call(session, "PATCH", url, data=pieces() if trickle else chunk, headers={
        "Content-Range": f"{offset}-{offset + len(chunk) - 1}", "Content-Type": "application/octet-stream"})


async def assert_blob_everywhere(session, bases: list[str], repo: str, data: bytes) -> None:
    """Every base (instance or balancer) serves the blob, byte for byte."""
    digest = sha256(data)
    for base in bases:
        got = await call(session, "GET", f"{base}/v2/{repo}/blobs/{digest}")
        assert got.status == 200, (base, got.status, got.body[:300])
        assert got.headers["Docker-Content-Digest"] == digest
        assert sha256(got.body) == digest and len(got.body) == len(data), base


def chunks_of(data: bytes, count: int) -> list[bytes]:
    step = -(-len(data) // count)
    return [data[i:i + step] for i in range(0, len(data), step)]


# ---------------------------------------------------------------- chunked uploads across instances


async def test_chunked_upload_hops_across_instances(alive):
    """POST on one instance, each PATCH on the next, PUT on yet another; every step's state is
    visible from a third instance; the blob is then served by all of them."""
    cluster = alive
    bases = cluster.bases
    repo = "scale/hops"
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 12345)
    async with aiohttp.ClientSession() as session:
        started = await call(session, "POST", f"{bases[0]}/v2/{repo}/blobs/uploads/")
        assert started.status == 202, started.body
        location = started.headers["Location"]
        # Relative, so that a client resolves it against whatever address it used: the balancer.
        assert location.startswith(f"/v2/{repo}/blobs/uploads/"), location
        offset, step = 0, 1
        for chunk in chunks_of(data, 3):
            answer = await patch(session, bases[step % INSTANCES] + location, chunk, offset)
            assert answer.status == 202, (step, answer.status, answer.body)
            offset += len(chunk)
            assert upload_end(answer) == offset
            location = answer.headers["Location"]
            status = await call(session, "GET", bases[(step + 1) % INSTANCES] + location)
            assert status.status == 204 and upload_end(status) == offset
            step += 1
        done = await call(session, "PUT", f"{bases[step % INSTANCES]}{location}?digest={sha256(data)}")
        assert done.status == 201, done.body
        assert done.headers["Docker-Content-Digest"] == sha256(data)
        # The session is gone everywhere.
        for base in bases:
            assert (await call(session, "GET", base + location)).status == 404
        await assert_blob_everywhere(session, bases, repo, data)


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
async def test_chunked_upload_through_balancer_is_spread(alive, kind):
    """Through the balancer, one client's upload requests land on every instance in turn
    (round-robin, no stickiness), and the upload completes."""
    cluster = alive
    balancer = cluster.balancers[kind]
    repo = f"scale/lb-{kind}"
    data = random.Random(2).randbytes(4 * 1024 * 1024 + 7)
    served_by = []
    async with aiohttp.ClientSession() as session:
        started = await call(session, "POST", f"{balancer.url}/v2/{repo}/blobs/uploads/")
        assert started.status == 202, started.body
        served_by.append(balancer.backend_index(started.headers[BACKEND_HEADER]))
        location, offset = started.headers["Location"], 0
        for chunk in chunks_of(data, 4):
            answer = await patch(session, balancer.url + location, chunk, offset)
            assert answer.status == 202, answer.body
            served_by.append(balancer.backend_index(answer.headers[BACKEND_HEADER]))
            offset += len(chunk)
            location = answer.headers["Location"]
        done = await call(session, "PUT", f"{balancer.url}{location}?digest={sha256(data)}")
        assert done.status == 201, (done.body, cluster.logs())
        served_by.append(balancer.backend_index(done.headers[BACKEND_HEADER]))
        await assert_blob_everywhere(session, [balancer.url, *cluster.bases], repo, data)
    assert set(served_by) == set(range(INSTANCES)), served_by
    assert all(a != b for a, b in zip(served_by, served_by[1:])), f"same instance twice in a row: {served_by}"


# ---------------------------------------------------------------- resuming after an instance died


@pytest.mark.parametrize("via", ["direct", "haproxy", "nginx"])
async def test_resume_after_instance_killed_between_patches(alive, via):
    """The instance that took the last PATCH is SIGKILLed; the client asks where the upload
    stands and finishes it on the others."""
    cluster = alive
    repo = f"scale/resume-{via}"
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 99)
    first, rest = data[:1024 * 1024], data[1024 * 1024:]
    bases = cluster.bases

    def url(base_index: int, location: str) -> str:
        return (bases[base_index] if via == "direct" else cluster.balancers[via].url) + location

    def backend(answer: Answer, expected: int) -> int:
        if via == "direct":
            return expected
        return cluster.balancers[via].backend_index(answer.headers[BACKEND_HEADER])

    async with aiohttp.ClientSession() as session:
        started = await call(session, "POST", url(0, f"/v2/{repo}/blobs/uploads/"))
        assert started.status == 202
        answer = await patch(session, url(0, started.headers["Location"]), first, 0)
        assert answer.status == 202 and upload_end(answer) == len(first)
        location = answer.headers["Location"]
        victim = backend(answer, 0)
        cluster.kill(victim)
        survivors = [i for i in range(INSTANCES) if i != victim]

        status = await call(session, "GET", url(survivors[0], location))
        assert status.status == 204, status.body
        assert upload_end(status) == len(first)
        assert backend(status, survivors[0]) != victim
        answer = await patch(session, url(survivors[0], location), rest, len(first))
        assert answer.status == 202, answer.body
        assert backend(answer, survivors[0]) != victim
        done = await call(session, "PUT", url(survivors[1], f"{answer.headers['Location']}?digest={sha256(data)}"))
        assert done.status == 201, done.body
        assert backend(done, survivors[1]) != victim
        await assert_blob_everywhere(session, [bases[i] for i in survivors], repo, data)
        cluster.restart(victim)
        await assert_blob_everywhere(session, [bases[victim]], repo, data)


async def test_resume_after_instance_killed_during_patch(alive):
    """The instance is SIGKILLed while a PATCH body is arriving. Another instance reports how
    much of the upload is stored (whatever the dead one wrote is a prefix of what was sent),
    and the client sends the rest there."""
    cluster = alive
    repo = "scale/resume-mid-patch"
    data = random.Random(4).randbytes(3 * 1024 * 1024)
    first = data[:1024 * 1024]
    half = 1024 * 1024
    bases = cluster.bases
    sent_half = asyncio.Event()

    async def stalled_body():
        yield data[len(first):len(first) + half // 2]
        yield data[len(first) + half // 2:len(first) + half]
        sent_half.set()
        await asyncio.sleep(60)  # the instance dies meanwhile
        yield data[len(first) + half:]

    async with aiohttp.ClientSession() as session:
        started = await call(session, "POST", f"{bases[0]}/v2/{repo}/blobs/uploads/")
        answer = await patch(session, bases[0] + started.headers["Location"], first, 0)
        assert answer.status == 202
        location = answer.headers["Location"]
        request = asyncio.ensure_future(call(session, "PATCH", bases[0] + location, data=stalled_body(), headers={
            "Content-Range": f"{len(first)}-{len(data) - 1}", "Content-Type": "application/octet-stream"}))
        await asyncio.wait_for(sent_half.wait(), 30)
        await asyncio.sleep(0.3)  # let the instance take (and perhaps write) what it was sent
        cluster.kill(0)
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await asyncio.wait_for(request, 30)

        status = await call(session, "GET", bases[1] + location)
        assert status.status == 204, status.body
        stored = upload_end(status)
        assert len(first) <= stored <= len(first) + half, stored
        answer = await patch(session, bases[1] + location, data[stored:], stored)
        assert answer.status == 202, answer.body
        done = await call(session, "PUT", f"{bases[2]}{answer.headers['Location']}?digest={sha256(data)}")
        assert done.status == 201, done.body
        await assert_blob_everywhere(session, bases[1:], repo, data)


# ---------------------------------------------------------------- token auth behind a balancer

AUTH_TOML = """
[auth]
mode = "token"
# The balancers run on loopback: believe their X-Forwarded-* headers.
trusted_proxies = ["127.0.0.1"]
"""
PASSWORD = "scale-out-password"


@pytest.fixture(scope="module")
def auth_cluster(shared_store, tmp_path_factory) -> Iterator[Cluster]:
    """Three instances with token auth, started at once on a fresh store (so they race to
    create its signing key), behind both balancers."""
    folder = tmp_path_factory.mktemp("auth-cluster")
    with running_cluster(folder, shared_store("auth"), extra_toml=AUTH_TOML) as cluster:
        added = subprocess.run([sys.executable, "-m", "kura", "user", "add", "alice", "--config",
                                str(cluster.instances.config_file)], cwd=REPO, input=PASSWORD + "\n",
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        yield cluster


def bearer_challenge(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
async def test_token_auth_through_balancer(auth_cluster, kind):
    """The realm names the balancer (its forwarded headers reach Kura), and a token that one
    instance issued is accepted by every instance a chunked upload then lands on."""
    cluster = auth_cluster
    balancer = cluster.balancers[kind]
    repo = f"scale/auth-{kind}"
    async with aiohttp.ClientSession() as session:
        challenge = await call(session, "GET", f"{balancer.url}/v2/")
        assert challenge.status == 401
        fields = bearer_challenge(challenge.headers["WWW-Authenticate"])
        assert fields["realm"] == f"{balancer.url}/auth/token", fields
        # Asked directly, an instance names itself: the realm above came from the balancer's headers.
        direct = await call(session, "GET", f"{cluster.bases[0]}/v2/")
        assert bearer_challenge(direct.headers["WWW-Authenticate"])["realm"] == f"{cluster.bases[0]}/auth/token"

        issued = await call(session, "GET", fields["realm"], params={
            "service": fields["service"], "scope": f"repository:{repo}:pull,push"},
            headers={"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()})
        assert issued.status == 200, issued.body
        issuer = balancer.backend_index(issued.headers[BACKEND_HEADER])
        token = json.loads(issued.body)["token"]
        auth = {"Authorization": f"Bearer {token}"}

        data = random.Random(5).randbytes(2 * 1024 * 1024 + 3)
        served_by = []
        started = await call(session, "POST", f"{balancer.url}/v2/{repo}/blobs/uploads/", headers=auth)
        assert started.status == 202, started.body
        served_by.append(balancer.backend_index(started.headers[BACKEND_HEADER]))
        location, offset = started.headers["Location"], 0
        for chunk in chunks_of(data, 2):
            answer = await call(session, "PATCH", balancer.url + location, data=chunk, headers={
                **auth, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
            assert answer.status == 202, answer.body
            served_by.append(balancer.backend_index(answer.headers[BACKEND_HEADER]))
            location, offset = answer.headers["Location"], offset + len(chunk)
        done = await call(session, "PUT", f"{balancer.url}{location}?digest={sha256(data)}", headers=auth)
        assert done.status == 201, done.body
        served_by.append(balancer.backend_index(done.headers[BACKEND_HEADER]))
        for base in cluster.bases:
            got = await call(session, "GET", f"{base}/v2/{repo}/blobs/{sha256(data)}", headers=auth)
            assert got.status == 200 and got.body == data, base
    assert set(served_by) == set(range(INSTANCES)) and issuer in served_by, (issuer, served_by)


# ---------------------------------------------------------------- skopeo through the balancers


def skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def skopeo_ok(cluster: Cluster, *args: str) -> bytes:
    proc = skopeo(*args)
    assert proc.returncode == 0, (f"skopeo {' '.join(args)} exited {proc.returncode}\n"
                                  f"{proc.stderr.decode(errors='replace')}\n--- logs:\n{cluster.logs()}")
    return proc.stdout


def layout_tags(layout: Path) -> dict[str, dict]:
    """tag -> its descriptor (digest, mediaType), from an OCI layout's index.json."""
    index = json.loads((layout / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}


INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", DOCKER_LIST}


def upload_backends(balancer: Balancer, repo: str) -> set[int]:
    """The instances that served requests of `repo`'s uploads (POST, PATCH, PUT), from the
    balancer's log."""
    prefix = f"/v2/{repo}/blobs/uploads/"
    return {routed.backend for routed in balancer.routed()
            if routed.path.startswith(prefix) and routed.backend is not None}


def round_trip(cluster: Cluster, kind: str, layout: str, repo: str, tmp_path: Path) -> None:
    """Push every tag of shared/images/<layout> through the balancer with skopeo, pull each
    distinct manifest back through it, and compare by digest, byte for byte."""
    balancer = cluster.balancers[kind]
    source = IMAGES / layout
    tags = layout_tags(source)
    target = f"docker://{balancer.host}/{repo}"
    docker_types = any(descriptor["mediaType"].startswith("application/vnd.docker.") for descriptor in tags.values())
    if docker_types:
        # skopeo's oci: transport cannot read Docker media types from an index (see
        # shared/images/README.md): the test client pushes it, through the balancer too.
        async def push() -> None:
            async with aiohttp.ClientSession() as session:
                client = RegistryClient(session, balancer.url)
                for tag in tags:
                    await client.push_layout(source, repo, tag)
        asyncio.run(push())
    for tag, descriptor in tags.items():
        if not docker_types:
            skopeo_ok(cluster, "copy", "--preserve-digests", "--dest-tls-verify=false",
                      *(["--all"] if descriptor["mediaType"] in INDEX_TYPES else []),
                      f"oci:{source}:{tag}", f"{target}:{tag}")
    pulled: set[str] = set()
    for tag, descriptor in tags.items():
        # Every tag names its manifest, byte for byte.
        raw = skopeo_ok(cluster, "inspect", "--raw", "--tls-verify=false", f"{target}:{tag}")
        assert raw == blob_path(source, descriptor["digest"]).read_bytes(), tag
        if descriptor["digest"] in pulled:
            continue
        pulled.add(descriptor["digest"])
        destination = tmp_path / f"pull-{tag}"
        extra = ["--all"] if descriptor["mediaType"] in INDEX_TYPES else []
        if docker_types:
            extra += ["--format", "v2s2", "--preserve-digests"]  # keep the Docker media types
        skopeo_ok(cluster, "copy", "--src-tls-verify=false", *extra, f"{target}:{tag}", f"oci:{destination}:{tag}")
        assert_layout_matches(source, destination, tag)
    # The push really was spread: every instance took part in the uploads.
    assert upload_backends(balancer, repo) == set(range(INSTANCES))


@pytest.mark.parametrize("layout", ["debian", "redis", "busybox-multiarch", "busybox-multiarch-docker"])
def test_skopeo_round_trip_through_haproxy(alive, tmp_path, layout):
    round_trip(alive, "haproxy", layout, f"library/{layout}", tmp_path)


def test_skopeo_round_trip_through_nginx(alive, tmp_path):
    # Another repository: the blobs are stored already but not linked there, so skopeo sends
    # every byte again, through nginx this time.
    round_trip(alive, "nginx", "redis", "via-nginx/redis", tmp_path)


# ---------------------------------------------------------------- SIGKILL loop


@dataclass
class Tally:
    skopeo_acknowledged: list = field(default_factory=list)  # (repo, tag, layout folder, digest)
    skopeo_failed: int = 0
    client_acknowledged: list = field(default_factory=list)  # (repo, tag, digest, {digest: bytes})
    resumed: int = 0  # uploads continued from the stored offset after a failure
    retried: int = 0  # requests the resuming client had to send again
    kills: list = field(default_factory=list)  # monotonic times
    pushes: list = field(default_factory=list)  # (start, end) of every skopeo push
    unexpected: list = field(default_factory=list)


class Retry(Exception):
    pass


MAX_TRIES = 60


async def resuming_blob_push(session, base: str, repo: str, data: bytes, chunk: int, tally: Tally) -> str:
    """Push `data` in chunks, carrying on after any failure from where the store says the
    upload stands (through the balancer: most likely another instance)."""
    digest = sha256(data)
    location = None
    offset = 0
    for attempt in range(MAX_TRIES):
        try:
            if location is None:
                answer = await call(session, "POST", f"{base}/v2/{repo}/blobs/uploads/")
                if answer.status != 202:
                    raise Retry(f"POST {answer.status}")
                location, offset = answer.headers["Location"], 0
            elif attempt:
                answer = await call(session, "GET", base + location)
                if answer.status == 404:
                    # Gone: committed by a PUT whose answer was lost, else start over.
                    head = await call(session, "HEAD", f"{base}/v2/{repo}/blobs/{digest}")
                    if head.status == 200:
                        return digest
                    location = None
                    raise Retry("session unknown")
                if answer.status != 204:
                    raise Retry(f"GET upload {answer.status}")
                if answer.headers["Range"] == "0-0":  # 0 or 1 byte stored: start this session over
                    await call(session, "DELETE", base + location)
                    location = None
                    raise Retry("ambiguous 0-0")
                offset = upload_end(answer)
                tally.resumed += offset > 0
            while offset < len(data):
                piece = data[offset:offset + chunk]
                answer = await patch(session, base + location, piece, offset, trickle=True)
                if answer.status != 202:
                    raise Retry(f"PATCH {answer.status}")
                location, offset = answer.headers["Location"], offset + len(piece)
            answer = await call(session, "PUT", f"{base}{location}?digest={digest}")
            if answer.status == 201:
                return digest
            if answer.status // 100 == 4 and answer.status != 404:
                tally.unexpected.append(f"PUT {answer.status} {answer.body[:200]!r}")
            raise Retry(f"PUT {answer.status}")
        except (Retry, aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
            tally.retried += 1
            await asyncio.sleep(0.1)
    raise AssertionError(f"blob {digest} not pushed after {MAX_TRIES} tries")


async def client_worker(base: str, number: int, rng: random.Random, stop_at: float, tally: Tally) -> None:
    repo = f"loop/client{number}"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < stop_at:
            layer = rng.randbytes(rng.choice([300_000, 2_500_000, 4_000_000]))
            config = json.dumps({"worker": number, "n": rng.random()}).encode()
            blobs = {}
            for data in (layer, config):
                blobs[await resuming_blob_push(session, base, repo, data, 1024 * 1024, tally)] = data
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": sha256(layer), "size": len(layer)}]}).encode()
            tag = f"t{rng.randrange(1 << 40):x}"
            for _ in range(MAX_TRIES):
                try:
                    answer = await call(session, "PUT", f"{base}/v2/{repo}/manifests/{tag}", data=manifest,
                                        headers={"Content-Type": OCI_MANIFEST})
                    if answer.status == 201:
                        tally.client_acknowledged.append((repo, tag, sha256(manifest), blobs))
                        break
                    if answer.status // 100 == 4:
                        tally.unexpected.append(f"manifest PUT {answer.status} {answer.body[:200]!r}")
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                    pass
                tally.retried += 1
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"manifest {repo}:{tag} not pushed after {MAX_TRIES} tries")


def tar_layer(rng: random.Random, size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size, info.mtime, info.mode = size, 1_700_000_000, 0o644
        tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return gzip.compress(out.getvalue(), compresslevel=1, mtime=0)


async def skopeo_worker(host: str, number: int, rng: random.Random, stop_at: float, folder: Path,
                        tally: Tally) -> None:
    repo = f"loop/skopeo{number}"
    count = 0
    while time.monotonic() < stop_at:
        count += 1
        tag = f"p{count}"
        layout = folder / f"w{number}-{count}"
        layer = await asyncio.to_thread(tar_layer, rng, rng.choice([100_000, 4_000_000, 16_000_000]))
        digest = await asyncio.to_thread(write_layout, layout, tag, layer,
                                         {"architecture": "amd64", "os": "linux", "config": {}})
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            "skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
            f"docker://{host}/{repo}:{tag}", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), SKOPEO_TIMEOUT)
        tally.pushes.append((started, time.monotonic()))
        if process.returncode == 0:
            tally.skopeo_acknowledged.append((repo, tag, layout, digest))
        else:
            tally.skopeo_failed += 1


async def killer(cluster: Cluster, rng: random.Random, stop_at: float, tally: Tally) -> None:
    """Kill a random instance every so often, and start it again after a moment: one at a time."""
    await asyncio.sleep(rng.uniform(0.5, 1.5))
    while time.monotonic() < stop_at:
        victim = rng.randrange(INSTANCES)
        cluster.kill(victim)
        tally.kills.append(time.monotonic())
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        cluster.instances.spawn(victim)  # in this (the main) thread: see tests/support/lifetime.py
        await asyncio.to_thread(cluster.instances.wait_serving, victim)
        await asyncio.sleep(rng.uniform(0.2, 1.0))


async def chaos(cluster: Cluster, folder: Path, seconds: float, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    balancer = cluster.balancers["haproxy"]
    stop_at = time.monotonic() + seconds
    workers = [skopeo_worker(balancer.host, n, random.Random(rng.random()), stop_at, folder, tally)
               for n in range(2)]
    workers += [client_worker(balancer.url, n, random.Random(rng.random()), stop_at, tally) for n in range(2)]
    # Every task runs to its end (they all stop at stop_at); the first failure is raised after.
    # (Failing fast would cancel tasks waiting on skopeo, which asyncio may never finish.)
    await settle(killer(cluster, random.Random(rng.random()), stop_at, tally), *workers)
    return tally


async def settle(*aws) -> None:
    """Await all, then raise the first exception any of them raised."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        raise failures[0]


async def verify_pushes(cluster: Cluster, tally: Tally, folder: Path) -> None:
    balancer = cluster.balancers["haproxy"]
    limit = asyncio.Semaphore(4)
    folder.mkdir(parents=True, exist_ok=True)

    async def pull(repo: str, tag: str, layout: Path, digest: str) -> None:
        destination = folder / f"pulled-{repo.replace('/', '-')}-{tag}"
        async with limit:
            process = await asyncio.create_subprocess_exec(
                "skopeo", "copy", "--src-tls-verify=false", f"docker://{balancer.host}/{repo}:{tag}",
                f"oci:{destination}:{tag}", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(process.communicate(), SKOPEO_TIMEOUT)
        assert process.returncode == 0, f"acknowledged push {repo}:{tag} does not pull: {err.decode()}"
        await asyncio.to_thread(assert_layout_matches, layout, destination, tag)
        assert tag_digest(destination, tag) == digest

    await settle(*(pull(*entry) for entry in tally.skopeo_acknowledged))
    async with aiohttp.ClientSession() as session:
        for repo, tag, digest, blobs in tally.client_acknowledged:
            answer = await call(session, "GET", f"{balancer.url}/v2/{repo}/manifests/{tag}",
                                headers={"Accept": OCI_MANIFEST})
            assert answer.status == 200, f"acknowledged push {repo}:{tag} was lost"
            assert sha256(answer.body) == digest
            for blob_digest, data in blobs.items():
                got = await call(session, "GET", f"{balancer.url}/v2/{repo}/blobs/{blob_digest}")
                assert got.status == 200 and got.body == data, f"{repo}:{tag}: blob {blob_digest}"


def kill_loop(storage_toml: str, folder: Path, seconds: float, seed: int) -> Tally:
    with running_cluster(folder / "cluster", storage_toml, balancers=("haproxy",)) as cluster:
        pushes = folder / "layouts"
        pushes.mkdir()
        tally = asyncio.run(chaos(cluster, pushes, seconds, seed))
        cluster.ensure_all_running()
        cluster.assert_fsck_clean()
        asyncio.run(verify_pushes(cluster, tally, folder / "pulled"))
        cluster.assert_fsck_clean()
        logs = "\n".join(instance.log.read_text(errors="replace") for instance in cluster.instances)
        cut = [r for r in cluster.balancers["haproxy"].routed() if r.cut_by_server]
    print(f"\nscale-out kill loop: {seconds:.0f} s, {len(tally.kills)} kills, skopeo pushes "
          f"{len(tally.skopeo_acknowledged)} acknowledged / {tally.skopeo_failed} failed, client pushes "
          f"{len(tally.client_acknowledged)} acknowledged, {tally.resumed} uploads resumed, "
          f"{tally.retried} requests retried, {len(cut)} requests cut off by a kill")
    assert not tally.unexpected, tally.unexpected
    assert tally.kills, "no instance was killed: the test proved nothing"
    in_flight = [t for t in tally.kills if any(start < t < end for start, end in tally.pushes)]
    assert in_flight, "no kill landed while a skopeo push was running"
    assert cut, "no kill cut off a request in flight (haproxy logged none): the test proved little"
    assert tally.skopeo_acknowledged and tally.client_acknowledged, "no push completed"
    if "Traceback" in logs:  # (not `assert ... not in logs`: pytest would diff megabytes of log)
        raise AssertionError("an instance logged a traceback:\n" + logs[logs.index("Traceback") - 2000:][:6000])
    return tally


def test_kill_instances_during_pushes(shared_store, tmp_path):
    require_shared()
    kill_loop(shared_store("kill-loop"), tmp_path, seconds=float(os.environ.get("KURA_SCALEOUT_LOOP_SECONDS", "20")),
              seed=20261201)


@pytest.mark.stress
def test_kill_instances_during_pushes_long(shared_store, tmp_path):
    kill_loop(shared_store("kill-loop-long"), tmp_path,
              seconds=float(os.environ.get("KURA_SCALEOUT_STRESS_SECONDS", "300")), seed=7)
