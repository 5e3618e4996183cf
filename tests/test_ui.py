"""The web UI (registry/ui/) through HTTP: every page, sign-in, the delete action and its
refusals (rights, CSRF, disabled deletes), and escaping of hostile text from manifests."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from registry.auth import htpasswd
from registry.auth.config import parse
from registry.notify.config import parse as parse_endpoints
from registry.ui import views
from tests.conftest import OCI_MANIFEST, push_image, serve_app
from tests.support.event_receiver import EventReceiver
from tests.support.ui_pages import HOSTILE, csrf_of, image_config, page, seed

PASSWORDS = {"admin": "admin-secret-1", "reader": "reader-secret-2"}
RULES = {
    "rules": [
        {"repositories": ["**"], "users": ["admin"], "actions": ["*"]},
        {"repositories": ["team/**"], "users": ["reader"], "actions": ["pull"]},
        {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]},
    ],
}
@pytest.fixture
async def open_client(aiohttp_client, config):
    """Auth off: everything is visible, anyone may delete."""
    client = await serve_app(aiohttp_client, config)
    client.digests = await seed(client)
    return client


@pytest.fixture
def auth_client(aiohttp_client, config):
    """A registry with accounts (htpasswd or token mode) seeded through an app without auth on
    the same store."""
    async def build(mode: str = "htpasswd", **changes):
        seeding = await serve_app(aiohttp_client, config)
        digests = await seed(seeding)
        for user, password in PASSWORDS.items():
            htpasswd.set_user(config.root / "auth" / "htpasswd", user, password, cost=4)
        auth = parse({"mode": mode, **RULES, **changes.pop("auth", {})})
        client = await serve_app(aiohttp_client, replace(config, auth=auth, **changes))
        client.digests = digests
        return client
    return build


async def sign_in(client, user: str, password: str | None = None, status: int = 303):
    form = await page(client, "/ui/login")
    r = await client.post("/ui/login", data={"username": user, "password": password or PASSWORDS[user],
                                              "csrf": csrf_of(form)}, allow_redirects=False)
    assert r.status == status, await r.text()
    return r


async def test_repository_list_search_and_pages(open_client, monkeypatch):
    text = await page(open_client, "/ui/")
    for name in ("team/app", "team/multi", "public/hello"):
        assert f'href="/ui/r/{name}"' in text
    assert "Sign in" not in text  # auth off: nobody signs in
    text = await page(open_client, "/ui/?q=multi")
    assert "team/multi" in text and "team/app" not in text and "public/hello" not in text
    assert "No repository matches" in await page(open_client, "/ui/?q=nothing-like-it")
    monkeypatch.setattr(views, "REPOSITORIES_PER_PAGE", 2)
    first, second = await page(open_client, "/ui/"), await page(open_client, "/ui/?page=2")
    assert "public/hello" in first and "team/app" in first and "team/multi" not in first
    assert "team/multi" in second and "team/app" not in second and "Page 2 of 2" in second


async def test_repository_list_shows_storage_usage(open_client):
    text = await page(open_client, "/ui/")
    row = re.search(r'href="/ui/r/public/hello">.*?</tr>', text, re.S).group(0)
    assert re.search(r">\d+ B<", row), row  # kura du's numbers: bytes held, bytes only here


async def test_tags_page(open_client, monkeypatch):
    digests = open_client.digests
    text = await page(open_client, "/ui/r/team/app")
    assert 'href="/ui/r/team/app/-/m/v1"' in text and 'href="/ui/r/team/app/-/m/v2"' in text
    assert digests["app"].split(":")[1][:12] in text
    assert "linux/amd64" in text and ">image<" in text
    assert ">artifact<" in text and "application/spdx+json" in text  # the SBOM, tagged `sbom`
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", text)  # pushed
    assert "docker pull 127.0.0.1:" in text and "/team/app:TAG" in text
    text = await page(open_client, "/ui/r/team/multi")
    row = re.search(r'-/m/latest".*?</tr>', text, re.S).group(0)
    assert ">index<" in row and "linux/amd64, linux/arm64" in row
    monkeypatch.setattr(views, "TAGS_PER_PAGE", 2)
    first, second = await page(open_client, "/ui/r/team/app"), await page(open_client, "/ui/r/team/app?page=2")
    assert "-/m/sbom" in first and "-/m/v1" in first and "-/m/v2" not in first
    assert "-/m/v2" in second and "-/m/v1" not in second
    await page(open_client, "/ui/r/team/nothing", 404)
    await page(open_client, "/ui/r/Not..A-Name", 404)


async def test_image_page(open_client):
    digests = open_client.digests
    text = await page(open_client, "/ui/r/team/app/-/m/v1")
    assert digests["app"] in text
    assert "docker pull 127.0.0.1:" in text and "/team/app:v1" in text and "kura pull 127.0.0.1:" in text
    assert 'id="layers"' in text and "app layer".encode().hex() not in text
    assert "9 B" in text  # the layer's size
    assert "redis-server" in text and "GREETING=hello" in text and "/data" in text and "6379/tcp" in text
    assert "apt-get install redis" in text  # history
    assert "application/spdx+json" in text and f'-/m/{digests["sbom"]}' in text  # its referrer
    assert 'id="delete-tag"' in text  # auth off: anyone may delete
    by_digest = await page(open_client, f"/ui/r/team/app/-/m/{digests['app']}")
    assert f"/team/app@{digests['app']}" in by_digest and 'id="delete-tag"' not in by_digest
    referrer = await page(open_client, f"/ui/r/team/app/-/m/{digests['sbom']}")
    assert "Refers to" in referrer and f'-/m/{digests["app"]}' in referrer and ">artifact<" in referrer
    await page(open_client, "/ui/r/team/app/-/m/nope", 404)
    await page(open_client, "/ui/r/team/app/-/m/sha256:" + "0" * 64, 404)
    await page(open_client, "/ui/r/team/app/-/m/sha256:short", 404)


async def test_index_page_links_each_platform(open_client):
    digests = open_client.digests
    text = await page(open_client, "/ui/r/team/multi/-/m/latest")
    for arch in ("amd64", "arm64"):
        assert f"linux/{arch}" in text and f'href="/ui/r/team/multi/-/m/{digests[arch]}"' in text
    child = await page(open_client, f"/ui/r/team/multi/-/m/{digests['arm64']}")
    assert "linux/arm64" in child and 'id="layers"' in child


async def test_hostile_text_is_escaped(open_client):
    config = image_config(Labels={"evil": HOSTILE}, Env=[f"X={HOSTILE}"])
    doc = json.loads(config)
    doc["history"][0]["created_by"] = '<img src=x onerror="alert(2)">'
    await push_image(open_client, "team/evil", "v1", layer=b"evil", config=json.dumps(doc).encode())
    for path in ("/ui/r/team/evil/-/m/v1", "/ui/r/team/app/-/m/v1", f"/ui/r/team/app/-/m/{open_client.digests['sbom']}",
                 "/ui/r/team/evil"):
        text = await page(open_client, path)
        assert "<script>alert" not in text and "<img src=x" not in text, path
    text = await page(open_client, "/ui/r/team/evil/-/m/v1")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x" in text
    r = await open_client.get("/ui/")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["X-Frame-Options"] == "DENY"
    # The search box echoes the query: escaped too.
    assert "<script>alert" not in await page(open_client, "/ui/?q=" + HOSTILE)


async def test_delete_with_auth_off_and_csrf(open_client):
    text = await page(open_client, "/ui/r/team/app")
    r = await open_client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": "forged"}, allow_redirects=False)
    assert r.status == 403 and "expired" in await r.text()
    r = await open_client.post("/ui/r/team/app/-/delete", data={"tag": "v2"}, allow_redirects=False)
    assert r.status == 403
    assert (await open_client.get("/v2/team/app/manifests/v2", headers={"Accept": OCI_MANIFEST})).status == 200
    r = await open_client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": csrf_of(text)},
                               allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/r/team/app?deleted=v2"
    assert (await open_client.get("/v2/team/app/manifests/v2", headers={"Accept": OCI_MANIFEST})).status == 404
    assert "Deleted tag v2." in await page(open_client, "/ui/r/team/app?deleted=v2")
    r = await open_client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": csrf_of(text)})
    assert r.status == 404


async def test_deletes_disabled(aiohttp_client, config):
    client = await serve_app(aiohttp_client, replace(config, delete_enabled=False))
    await seed(client)
    text = await page(client, "/ui/r/team/app/-/m/v1")
    assert 'id="delete-tag"' not in text
    r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v1", "csrf": csrf_of(text)})
    assert r.status == 403 and "Deletes are disabled" in await r.text()


async def test_ui_can_be_turned_off(aiohttp_client, config):
    client = await serve_app(aiohttp_client, replace(config, ui_enabled=False))
    assert (await client.get("/ui/")).status == 404
    assert (await client.get("/v2/")).status == 200


@pytest.mark.parametrize("mode", ["htpasswd", "token"])
async def test_sign_in_sees_what_the_rules_allow(auth_client, mode):
    client = await auth_client(mode)
    text = await page(client, "/ui/")  # anonymous: what anonymous pulls allow
    assert "public/hello" in text and "team/app" not in text and 'id="sign-in"' in text
    assert "Sign in to see more" in await page(client, "/ui/r/team/app", 404)
    r = await sign_in(client, "reader", "wrong password", status=401)
    assert "Wrong user name or password" in await r.text()
    r = await sign_in(client, "reader")
    assert r.headers["Location"] == "/ui/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie and "Secure" not in cookie
    text = await page(client, "/ui/")
    assert 'id="signed-in">reader<' in text and "team/app" in text and "public/hello" in text
    text = await page(client, "/ui/r/team/app/-/m/v1")
    assert "GREETING=hello" in text and 'id="delete-tag"' not in text
    # A reader may not delete, even with a valid form.
    r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v1", "csrf": csrf_of(text)})
    assert r.status == 403 and "You may not delete tags of team/app" in await r.text()
    assert "-/m/v1" in await page(client, "/ui/r/team/app")
    r = await client.post("/ui/logout", data={"csrf": csrf_of(text)}, allow_redirects=False)
    assert r.status == 303
    assert "team/app" not in await page(client, "/ui/")


async def test_admin_deletes_and_anonymous_cannot(auth_client):
    client = await auth_client()
    text = await page(client, "/ui/r/public/hello")
    assert 'id="delete-1"' not in text
    r = await client.post("/ui/r/public/hello/-/delete", data={"tag": "1", "csrf": csrf_of(text)})
    assert r.status == 403 and "Sign in to delete tags" in await r.text()
    await sign_in(client, "admin")
    text = await page(client, "/ui/r/team/app")
    assert 'id="delete-v2"' in text
    r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": "x" + csrf_of(text)})
    assert r.status == 403  # the token of another session, or none, is refused
    r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": csrf_of(text)}, allow_redirects=False)
    assert r.status == 303
    assert "-/m/v2" not in await page(client, "/ui/r/team/app")


async def test_a_tag_deleted_in_the_ui_is_an_event_naming_who_deleted_it(auth_client):
    receiver = await EventReceiver().start()
    try:
        hooks = parse_endpoints([{"url": receiver.url, "backoff_seconds": 0.05}])
        client = await auth_client(notifications=hooks)
        await sign_in(client, "admin")
        text = await page(client, "/ui/r/team/app")
        r = await client.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": csrf_of(text)},
                              allow_redirects=False)
        assert r.status == 303
        (event,) = await receiver.wait_for(1)
        assert event["action"] == "delete" and event["actor"] == {"name": "admin"}
        assert event["target"] == {"repository": "team/app", "tag": "v2"}
    finally:
        await receiver.stop()


async def test_the_csrf_token_of_one_session_fails_in_another(auth_client, aiohttp_client):
    client = await auth_client()
    await sign_in(client, "admin")
    token = csrf_of(await page(client, "/ui/r/team/app"))
    other = await aiohttp_client(client.server)  # another browser, signed in as admin too
    await sign_in(other, "admin")
    r = await other.post("/ui/r/team/app/-/delete", data={"tag": "v2", "csrf": token})
    assert r.status == 403


async def test_sessions_end_with_the_password_and_cannot_be_forged(auth_client, config):
    client = await auth_client()
    await sign_in(client, "admin")
    assert 'id="signed-in">admin<' in await page(client, "/ui/")
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/ui/"))["kura_ui_session"].value
    payload, mac = cookie.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac
    r = await client.get("/ui/", cookies={"kura_ui_session": forged})
    assert 'id="signed-in"' not in await r.text()
    htpasswd.set_user(config.root / "auth" / "htpasswd", "admin", "a-new-password", cost=4)
    assert 'id="signed-in"' not in await page(client, "/ui/")


async def test_failed_sign_ins_are_limited(auth_client):
    client = await auth_client(auth={"login_attempts": 2})
    for _ in range(2):
        await sign_in(client, "admin", "wrong", status=401)
    r = await sign_in(client, "admin", status=429)
    assert "too many failed logins" in (await r.text()).lower() and int(r.headers["Retry-After"]) > 0


async def test_sign_in_needs_the_form_token_and_goes_back_only_within_the_ui(auth_client):
    client = await auth_client()
    r = await client.post("/ui/login", data={"username": "admin", "password": PASSWORDS["admin"]},
                          allow_redirects=False)
    assert r.status == 403
    form = await page(client, "/ui/login?next=https://evil.example/")
    r = await client.post("/ui/login", data={"username": "admin", "password": PASSWORDS["admin"],
                                             "csrf": csrf_of(form), "next": "//evil.example/ui/"},
                          allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/"
    form = await page(client, "/ui/login")
    r = await client.post("/ui/login", data={"username": "admin", "password": PASSWORDS["admin"],
                                             "csrf": csrf_of(form), "next": "/ui/r/team/app"},
                          allow_redirects=False)
    assert r.headers["Location"] == "/ui/r/team/app"


async def test_static_files_and_unknown_pages(open_client):
    r = await open_client.get("/ui/static/kura.css")
    assert r.status == 200 and "text/css" in r.headers["Content-Type"]
    assert (await open_client.get("/ui/static/kura.js")).status == 200
    assert "no such page" in await page(open_client, "/ui/nothing/here", 404)
    r = await open_client.get("/ui", allow_redirects=False)
    assert r.status == 301 and r.headers["Location"] == "ui/"


async def test_behind_a_reverse_proxy_with_a_path_prefix(auth_client):
    """Links, redirects, the cookie's path and the pull commands follow X-Forwarded-* from a
    trusted proxy (the test client's loopback address is one by default)."""
    client = await auth_client()
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example:8443",
                 "X-Forwarded-Prefix": "/kura"}
    r = await client.get("/ui/login?next=/kura/ui/r/team/app", headers=forwarded)
    form = await r.text()
    assert 'href="/kura/ui/"' in form and 'action="/kura/ui/login"' in form and "/kura/ui/static/kura.css" in form
    assert "Path=/kura/ui/" in r.headers["Set-Cookie"] and "Secure" in r.headers["Set-Cookie"]
    # (the test client keeps no Secure cookie over plain HTTP: send it along by hand)
    cookie = {"kura_ui_session": r.cookies["kura_ui_session"].value}
    r = await client.post("/ui/login", headers=forwarded, cookies=cookie, allow_redirects=False,
                          data={"username": "admin", "password": PASSWORDS["admin"], "csrf": csrf_of(form),
                                "next": "/kura/ui/r/team/app"})
    assert r.status == 303 and r.headers["Location"] == "/kura/ui/r/team/app"
    cookie = {"kura_ui_session": r.cookies["kura_ui_session"].value}
    text = await (await client.get("/ui/r/team/app/-/m/v1", headers=forwarded, cookies=cookie)).text()
    assert "docker pull registry.example:8443/kura/team/app:v1" in text
    assert 'href="/kura/ui/r/team/app"' in text and 'action="/kura/ui/r/team/app/-/delete"' in text


def test_session_cookies_expire_and_keep_their_key(tmp_path):
    from registry.config import Config
    from registry.ui.session import Session, Sessions

    config = replace(Config(), root=tmp_path / "data")
    sessions = Sessions(config)
    alive = Session.start("admin", "fingerprint")
    assert sessions.decode(sessions.encode(alive)) == alive
    expired = replace(alive, expires=alive.expires - 13 * 3600)
    assert sessions.decode(sessions.encode(expired)) is None
    assert sessions.decode("not.a-cookie") is None and sessions.decode(None) is None
    key = tmp_path / "data" / "auth" / "ui-session.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = Sessions(config)  # another process on the same store: the same key
    assert again.decode(sessions.encode(alive)) == alive
    assert again.csrf_ok(alive, sessions.csrf_token(alive)) and not again.csrf_ok(Session.start(), sessions.csrf_token(alive))
