"""The request line and X-Request-Id (registry/access_log.py), the text and JSON formats and
the scrubbing of secrets (registry/logformat.py), the warnings of auth decisions."""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from dataclasses import replace

import pytest

from registry.auth import htpasswd
from registry.auth.config import parse
from registry.logformat import CURRENT_REQUEST, JsonFormatter, RequestLine, TextFormatter, scrub
from tests.conftest import OCI_MANIFEST, image_manifest, serve_app
from tests.support.client import sha256

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
RULES = {"rules": [{"repositories": ["team/**"], "users": ["alice", "bob"], "actions": ["pull", "push"]},
                   {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]}]}
REQUEST_FIELDS = {"request_id", "method", "path", "status", "repository", "digest", "user", "client",
                  "user_agent", "bytes_sent", "bytes_received", "duration_ms"}


def basic(user: str, password: str | None = None) -> dict:
    raw = f"{user}:{password or PASSWORDS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture
async def basic_client(aiohttp_client, config):
    for user, password in PASSWORDS.items():
        htpasswd.set_user(config.root / "auth" / "htpasswd", user, password, cost=4)
    return await serve_app(aiohttp_client, replace(config, auth=parse({"mode": "htpasswd", **RULES})))


async def push(client, headers: dict) -> str:
    """team/app:v1, an image without layers; its digest."""
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={sha256(b'{}')}", data=b"{}", headers=headers)
    assert r.status == 201, await r.text()
    r = await client.put("/v2/team/app/manifests/v1", data=image_manifest(sha256(b"{}"), 2),
                         headers={**headers, "Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return r.headers["Docker-Content-Digest"]


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if isinstance(r.msg, RequestLine)]


async def test_every_response_carries_its_own_request_id(basic_client):
    ids = set()
    for path, headers, status in [("/v2/", basic("alice"), 200),
                                  ("/v2/", {}, 401),
                                  ("/v2/team/app/manifests/nope", basic("alice"), 404),
                                  ("/v2/team/app/manifests/v1", basic("alice", "wrong-password"), 401),
                                  ("/v2/BAD/tags/list", basic("alice"), 400),
                                  ("/nowhere", {}, 404)]:
        r = await basic_client.get(path, headers=headers)
        assert r.status == status, path
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"]), path
        ids.add(r.headers["X-Request-Id"])
    assert len(ids) == 6


async def test_request_line_fields(basic_client, caplog):
    caplog.set_level(logging.INFO, logger="aiohttp.access")  # the test server's access logger
    digest = await push(basic_client, basic("alice"))
    manifest = image_manifest("sha256:" + "0" * 64, 2)  # the size of a body only
    caplog.clear()
    r = await basic_client.get("/v2/team/app/manifests/v1", headers={**basic("alice"), "User-Agent": "probe/1.0"})
    body = await r.read()
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == digest
    r2 = await basic_client.put("/v2/team/app/manifests/bad?password=hunter2", data=manifest,
                                headers={**basic("bob"), "Content-Type": OCI_MANIFEST})
    assert r2.status == 400  # its config blob is unknown
    get, put = request_lines(caplog)
    fields = get.msg.fields
    assert set(fields) == REQUEST_FIELDS
    assert fields["request_id"] == r.headers["X-Request-Id"]
    assert (fields["method"], fields["path"], fields["status"]) == ("GET", "/v2/team/app/manifests/v1", 200)
    assert (fields["user"], fields["repository"], fields["digest"]) == ("alice", "team/app", digest)
    assert (fields["client"], fields["user_agent"], fields["bytes_received"]) == ("127.0.0.1", "probe/1.0", 0)
    assert fields["bytes_sent"] > len(body) and fields["duration_ms"] > 0
    fields = put.msg.fields
    assert fields["request_id"] == r2.headers["X-Request-Id"] != r.headers["X-Request-Id"]
    assert (fields["method"], fields["status"], fields["user"]) == ("PUT", 400, "bob")
    assert fields["path"] == "/v2/team/app/manifests/bad?password=[redacted]"
    assert fields["bytes_received"] == len(manifest) and fields["digest"] is None

    text = TextFormatter().format(get)
    assert re.search(r' INFO aiohttp.access: 127\.0\.0\.1 "GET /v2/team/app/manifests/v1 HTTP/1\.1" 200 \d+ 0 '
                     rf'[0-9.]+ms id={r.headers["X-Request-Id"]} user=alice repo=team/app digest={digest} '
                     r'ua=probe/1\.0$', text), text
    entry = json.loads(JsonFormatter(worker=3).format(put))
    assert {"ts", "level", "logger", "message", "worker", "pid"} | REQUEST_FIELDS == set(entry)
    assert (entry["level"], entry["worker"], entry["user"], entry["repository"]) == ("info", 3, "bob", "team/app")
    assert entry["message"] == "PUT /v2/team/app/manifests/bad?password=[redacted] 400"


async def test_token_mode_names_who_logged_in_and_warns_of_a_token_short_of_scope(aiohttp_client, config, caplog):
    htpasswd.set_user(config.root / "auth" / "htpasswd", "alice", PASSWORDS["alice"], cost=4)
    client = await serve_app(aiohttp_client, replace(config, auth=parse({"mode": "token", **RULES})))
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    r = await client.get("/auth/token", params={"service": "kura", "scope": "repository:team/app:pull"},
                         headers=basic("alice"))
    assert r.status == 200
    (line,) = request_lines(caplog)
    assert line.msg.fields["user"] == "alice" and line.msg.fields["request_id"] == r.headers["X-Request-Id"]
    token = (await r.json())["token"]
    r = await client.post("/v2/team/app/blobs/uploads/", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401
    warnings = [r.getMessage() for r in caplog.records if r.name == "kura.auth" and r.levelno == logging.WARNING]
    assert warnings == ["denied: user 'alice' from 127.0.0.1 may not pull,push repository:team/app (not in the token)"]


async def test_auth_decisions_are_warnings_with_user_reason_and_address(basic_client, caplog):
    caplog.set_level(logging.WARNING, logger="kura.auth")
    assert (await basic_client.get("/v2/team/app/tags/list", headers=basic("alice", "not-it"))).status == 401
    assert (await basic_client.put("/v2/public/lib/manifests/v1", data=b"{}", headers=basic("bob"))).status == 403
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "kura.auth"]
    assert (logging.WARNING, "failed login for user 'alice' from 127.0.0.1: wrong password") in messages
    assert (logging.WARNING, "denied: user 'bob' from 127.0.0.1 may not pull,push repository:public/lib") in messages
    assert not any("not-it" in text or PASSWORDS["bob"] in text for _, text in messages)


@pytest.mark.parametrize("text, kept", [
    ("Authorization: Basic YWxpY2U6c2VjcmV0LXB3", "Authorization: Basic [redacted]"),
    ("authorization: bearer abc.def-ghi_jkl", "authorization: bearer [redacted]"),
    ("/auth/token?service=kura&password=p%40ss&scope=x", "/auth/token?service=kura&password=[redacted]&scope=x"),
    ("grant_type=refresh_token&refresh_token=xyz123&service=kura",
     "grant_type=refresh_token&refresh_token=[redacted]&service=kura"),
    ("GET /metrics?token=s3cr3t HTTP/1.1", "GET /metrics?token=[redacted] HTTP/1.1"),
    ("https://s3/b/k?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=9f8e7d&X-Amz-Security-Token=FwoG x",
     "https://s3/b/k?X-Amz-Credential=[redacted]&X-Amz-Signature=[redacted]&X-Amz-Security-Token=[redacted] x"),
    ('{"username": "alice", "password": "pw1234567"}', '{"username": "alice", "password": "[redacted]"}'),
    ("{'secret_key': 'AbCdEf123'}", "{'secret_key': '[redacted]'}"),
    ("token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl seen", "token [redacted] seen"),
    # what is not a secret stays readable
    ("invalid token: token has expired", "invalid token: token has expired"),
    ('Bearer realm="http://x/auth/token",service="kura"', 'Bearer realm="http://x/auth/token",service="kura"'),
    ("offline_token=true&scope=repository:a:pull", "offline_token=true&scope=repository:a:pull"),
])
def test_scrub(text, kept):
    assert scrub(text) == kept


def test_json_lines_name_the_request_and_scrub_exceptions():
    try:
        raise ValueError("refused Basic YWxpY2U6c2VjcmV0LXB3")
    except ValueError:
        record = logging.LogRecord("kura.registry", logging.ERROR, __file__, 1, "failed with password=%s",
                                   ("hunter2",), sys.exc_info())
    token = CURRENT_REQUEST.set("abc123")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        CURRENT_REQUEST.reset(token)
    assert (entry["level"], entry["logger"], entry["request_id"]) == ("error", "kura.registry", "abc123")
    assert entry["message"] == "failed with password=[redacted]" and "worker" not in entry
    assert "ValueError: refused Basic [redacted]" in entry["exception"]
    text = TextFormatter(worker=2).format(record)
    assert " worker 2 (pid " in text and "hunter2" not in text and "YWxpY2U6" not in text
