"""A real `kura serve` at log level debug, in token mode (JSON lines) and htpasswd mode (text
lines): logins with right and wrong passwords, token requests, pushes and pulls with tokens
and passwords, the real client's login, push and pull. Then no password, issued token or
Basic credential is anywhere in its log, and every request line carries its fields."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from registry.auth import htpasswd
from tests.conftest import OCI_MANIFEST, image_manifest
from tests.support.cli import client_env
from tests.support.client import sha256
from tests.support.layouts import write_layout
from tests.support.paths import REPO
from tests.support.servers import start_kura, stop

PASSWORDS = {"alice": "alice-Pa55word-1", "bob": "bob-Pa55word-2"}
WRONG = "wrong-Pa55word-9"
CONFIG = """
[log]
level = "debug"
format = "{format}"

[auth]
mode = "{mode}"

[[auth.rules]]
repositories = ["team/**"]
users = ["alice", "bob"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["public/**"]
anonymous = true
actions = ["pull"]
"""
REQUEST_FIELDS = {"request_id", "method", "path", "status", "repository", "digest", "user", "client",
                  "user_agent", "bytes_sent", "bytes_received", "duration_ms"}


def call(method: str, url: str, headers: dict | None = None, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def basic_value(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + basic_value(user, password)}


def form(**fields) -> tuple[dict, bytes]:
    return {"Content-Type": "application/x-www-form-urlencoded"}, urllib.parse.urlencode(fields).encode()


class Session:
    """The requests of one test against its server, and every secret they used."""

    def __init__(self, base: str):
        self.base = base
        self.secrets = set(PASSWORDS.values()) | {WRONG} | {basic_value(u, p) for u, p in PASSWORDS.items()} \
            | {basic_value(u, WRONG) for u in PASSWORDS}

    def token(self, body: bytes) -> str:
        document = json.loads(body)
        for key in ("token", "access_token", "refresh_token"):
            if key in document:
                self.secrets.add(document[key])
        return document["token"]

    def push(self, headers: dict, repo: str = "team/app") -> tuple[str, bytes]:
        status, _, body = call("POST", f"{self.base}/v2/{repo}/blobs/uploads/?digest={sha256(b'{}')}",
                               headers, b"{}")
        assert status == 201, body
        manifest = image_manifest(sha256(b"{}"), 2)
        status, answer, body = call("PUT", f"{self.base}/v2/{repo}/manifests/v1",
                                    {**headers, "Content-Type": OCI_MANIFEST}, manifest)
        assert status == 201, body
        return answer["Docker-Content-Digest"], manifest

    def pull(self, headers: dict, repo: str = "team/app") -> None:
        status, answer, body = call("GET", f"{self.base}/v2/{repo}/manifests/v1",
                                    {**headers, "Accept": OCI_MANIFEST})
        assert status == 200, body
        assert call("GET", f"{self.base}/v2/{repo}/blobs/{sha256(b'{}')}", headers)[0] == 200

    def lock_out(self, ask) -> None:
        """Wrong passwords for bob until the server slows him down (429)."""
        statuses = [ask(basic("bob", WRONG)) for _ in range(8)]
        assert statuses[0] == 401 and 429 in statuses, statuses


def kura(home: Path, *args: str, stdin: str = "") -> None:
    ran = subprocess.run([sys.executable, "-m", "kura", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=client_env(home), input=stdin)
    assert ran.returncode == 0, ran.stderr


def client_round_trip(tmp_path: Path, host: str) -> None:
    """The real client: login, push of a one-layer layout, pull."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    write_layout(tmp_path / "layout", "1", gzip.compress(layer.getvalue(), mtime=0),
                 {"architecture": "amd64", "os": "linux"})
    home = tmp_path / "client"
    kura(home, "login", "-u", "alice", "--password-stdin", host, stdin=PASSWORDS["alice"] + "\n")
    kura(home, "push", f"oci:{tmp_path / 'layout'}:1", f"{host}/team/cli:1")
    kura(home, "pull", f"{host}/team/cli:1")


def start(tmp_path: Path, mode: str, format: str):
    root = tmp_path / "data"
    for user, password in PASSWORDS.items():
        htpasswd.set_user(root / "auth" / "htpasswd", user, password, cost=4)
    config = tmp_path / "kura.toml"
    config.write_text(CONFIG.format(mode=mode, format=format))
    log = tmp_path / "kura.log"
    return start_kura(root, None, "--config", str(config), log=log), log


def assert_no_secrets(text: str, secrets: set[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret[:12]}... is in the log"
    assert "eyJ" not in text  # no JWT at all, not even those the real client was issued
    assert "Authorization" not in text and "authorization" not in text


def test_token_mode_json_log_has_no_secrets_and_every_field(tmp_path):
    server, log = start(tmp_path, "token", "json")
    base, session = server.url, Session(server.url)
    token_url = f"{base}/auth/token?service=kura&scope=repository:team/app:pull,push"
    try:
        status, _, body = call("GET", token_url, basic("alice", PASSWORDS["alice"]))
        assert status == 200
        push_token = session.token(body)
        failed_login_id = call("GET", token_url, basic("alice", WRONG))[1]["X-Request-Id"]
        status, _, body = call("POST", f"{base}/auth/token", *form(
            grant_type="password", username="alice", password=PASSWORDS["alice"], service="kura",
            access_type="offline", scope="repository:team/app:pull"))
        assert status == 200
        session.token(body)
        refresh = json.loads(body)["refresh_token"]
        assert call("POST", f"{base}/auth/token", *form(grant_type="password", username="alice", password=WRONG,
                                                        service="kura"))[0] == 401
        status, _, body = call("POST", f"{base}/auth/token", *form(grant_type="refresh_token", refresh_token=refresh,
                                                                   service="kura", scope="repository:team/app:pull"))
        assert status == 200
        pull_token = session.token(body)
        assert call("POST", f"{base}/auth/token", *form(grant_type="refresh_token", refresh_token=refresh[:-4],
                                                        service="kura"))[0] == 401
        digest, manifest = session.push({"Authorization": f"Bearer {push_token}"})
        session.pull({"Authorization": f"Bearer {pull_token}"})
        assert call("GET", f"{base}/v2/team/app/tags/list", {"Authorization": f"Bearer {push_token[:-6]}"})[0] == 401
        assert call("GET", f"{base}/v2/team/app/tags/list?token={push_token}&password={PASSWORDS['bob']}")[0] == 401
        session.lock_out(lambda headers: call("GET", token_url, headers)[0])
        client_round_trip(tmp_path, server.host)
    finally:
        stop(server)
    text = log.read_text()
    assert_no_secrets(text, session.secrets)

    entries = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in entries)
    requests = [entry for entry in entries if entry["logger"] == "aiohttp.access"]
    assert requests and all(REQUEST_FIELDS <= set(entry) for entry in requests)
    assert len({entry["request_id"] for entry in requests}) == len(requests)
    (put,) = [e for e in requests if e["method"] == "PUT" and e["path"] == "/v2/team/app/manifests/v1"]
    assert (put["status"], put["user"], put["repository"], put["digest"]) == (201, "alice", "team/app", digest)
    assert put["bytes_received"] == len(manifest) and put["client"] == "127.0.0.1" and put["duration_ms"] > 0
    (get,) = [e for e in requests if e["method"] == "GET" and e["path"] == f"/v2/team/app/blobs/{sha256(b'{}')}"]
    assert (get["status"], get["user"], get["digest"]) == (200, "alice", sha256(b"{}"))
    assert get["bytes_sent"] > 2 and get["user_agent"].startswith("Python-urllib/")
    assert any(e["path"] == "/v2/team/cli/manifests/1" and e["user"] == "alice" and e["status"] == 201
               for e in requests)  # the real client's push
    tokens = [e for e in requests if e["path"].startswith("/auth/token")]
    assert {"alice", None} == {e["user"] for e in tokens}
    assert any("token=[redacted]" in e["path"] and "password=[redacted]" in e["path"] for e in requests)

    warnings = [e for e in entries if e["level"] == "warning" and e["logger"] == "kura.auth"]
    said = [e["message"] for e in warnings]
    failed = [e for e in warnings if e["message"] == "failed login for user 'alice' from 127.0.0.1: wrong password"]
    assert len(failed) == 2 and failed[0]["request_id"] == failed_login_id
    assert any(m.startswith("failed login for user 'bob' from 127.0.0.1: locked out") for m in said), said
    assert "refused a refresh token from 127.0.0.1: invalid refresh token: signature does not verify " \
           "with any trusted key" in said, said
    assert "refused a token from 127.0.0.1: signature does not verify with any trusted key" in said, said


def test_htpasswd_mode_text_log_has_no_secrets_and_every_field(tmp_path):
    server, log = start(tmp_path, "htpasswd", "text")
    base, session = server.url, Session(server.url)
    try:
        assert call("GET", f"{base}/v2/", basic("alice", PASSWORDS["alice"]))[0] == 200
        assert call("GET", f"{base}/v2/", basic("alice", WRONG))[0] == 401
        assert call("GET", f"{base}/v2/?password={PASSWORDS['alice']}")[0] == 401
        digest, manifest = session.push(basic("alice", PASSWORDS["alice"]))
        session.pull(basic("bob", PASSWORDS["bob"]))
        denied = call("PUT", f"{base}/v2/public/lib/manifests/v1", basic("bob", PASSWORDS["bob"]), b"{}")
        assert denied[0] == 403
        session.lock_out(lambda headers: call("GET", f"{base}/v2/", headers)[0])
        client_round_trip(tmp_path, server.host)
    finally:
        stop(server)
    text = log.read_text()
    assert_no_secrets(text, session.secrets)

    lines = text.splitlines()
    requests = [line for line in lines if " INFO aiohttp.access: " in line]
    shape = re.compile(r'^\S+ \S+ INFO aiohttp\.access: 127\.0\.0\.1 "[A-Z]+ \S+ HTTP/1\.1" \d{3} \d+ \d+ [0-9.]+ms '
                       r'id=[0-9a-f]{32} user=\S+ repo=\S+ digest=\S+ ua=(\S+|"[^"]+")$')
    assert requests and all(shape.match(line) for line in requests), [r for r in requests if not shape.match(r)]
    assert any('"PUT /v2/team/app/manifests/v1 HTTP/1.1" 201 ' in line and f" {len(manifest)} " in line
               and f"user=alice repo=team/app digest={digest} " in line for line in requests)
    assert any('"GET /v2/team/app/manifests/v1 HTTP/1.1" 200 ' in line
               and f"user=bob repo=team/app digest={digest} " in line for line in requests)
    assert any('"GET /v2/?password=[redacted] HTTP/1.1" 401 ' in line and "user=- " in line for line in requests)
    assert any('"GET /v2/team/cli/manifests/1 HTTP/1.1" 200 ' in line and "user=alice" in line
               for line in requests)  # the real client's pull
    warnings = [line for line in lines if " WARNING kura.auth: " in line]
    assert any(line.endswith("failed login for user 'alice' from 127.0.0.1: wrong password") for line in warnings)
    assert any(line.endswith("denied: user 'bob' from 127.0.0.1 may not pull,push repository:public/lib")
               for line in warnings)
    assert any("failed login for user 'bob' from 127.0.0.1: locked out" in line for line in warnings)



def test_json_lines_of_workers_name_the_worker(tmp_path):
    config = tmp_path / "kura.toml"
    config.write_text('[log]\nformat = "json"\n')
    log = tmp_path / "kura.log"
    server = start_kura(tmp_path / "data", None, "--config", str(config), log=log, workers=2)
    try:
        status, headers, _ = call("GET", f"{server.url}/v2/")
        assert status == 200
    finally:
        stop(server)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    (line,) = [e for e in entries if e["logger"] == "aiohttp.access" and e["request_id"] == headers["X-Request-Id"]]
    assert line["worker"] in (1, 2) and line["pid"] != server.process.pid
    supervisor = [e for e in entries if e["message"].startswith("2 workers (pids ")]
    assert len(supervisor) == 1 and "worker" not in supervisor[0]
