"""Auth over the API: token issuer + Bearer registry, htpasswd Basic, rules, rate limits."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from dataclasses import replace

import pytest

from registry.app import make_app
from registry.auth import htpasswd, jwt
from registry.auth.config import parse
from registry.auth.controller import AUTH
from tests.conftest import OCI_MANIFEST, error_code, image_manifest
from tests.support.client import sha256

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2", "carol": "carol-secret-3"}
RULES = {
    "groups": {"team": ["alice", "bob"]},
    "rules": [
        {"repositories": ["team/**"], "groups": ["team"], "actions": ["pull", "push"]},
        {"repositories": ["team/**"], "users": ["alice"], "actions": ["delete"]},
        {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]},
        {"repositories": ["public/**", "carol/**"], "users": ["carol"], "actions": ["*"]},
        {"catalog": True, "users": ["alice", "bob", "carol"], "actions": ["*"]},
    ],
}


def basic(user: str, password: str | None = None) -> dict:
    raw = f"{user}:{password if password is not None else PASSWORDS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture
def make_auth_client(aiohttp_client, config):
    async def build(mode: str, **extra):
        path = config.root / "auth" / "htpasswd"
        for user, password in PASSWORDS.items():
            htpasswd.set_user(path, user, password, cost=4)
        section = {"mode": mode, **RULES, **extra}
        return await aiohttp_client(make_app(replace(config, auth=parse(section))))
    return build


async def token_for(client, *scopes, user: str | None = None, **params) -> str:
    query = [("service", "kura")] + [("scope", s) for s in scopes] + list(params.items())
    r = await client.get("/auth/token", params=query, headers=basic(user) if user else {})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["token"] == body["access_token"]
    return body["token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def push_with(client, headers, repo="team/app", tag="v1", data=b"layer") -> str:
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", data=data, headers=headers)
    assert r.status == 201, await r.text()
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={sha256(b'{}')}", data=b"{}", headers=headers)
    assert r.status == 201
    manifest = image_manifest(sha256(b"{}"), 2, [(sha256(data), len(data))])
    r = await client.put(f"/v2/{repo}/manifests/{tag}", data=manifest,
                         headers={**headers, "Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return sha256(manifest)


async def test_challenge_on_version_check(make_auth_client):
    client = await make_auth_client("token")
    r = await client.get("/v2/")
    assert r.status == 401 and await error_code(r) == "UNAUTHORIZED"
    challenge = r.headers["WWW-Authenticate"]
    assert challenge == f'Bearer realm="http://{client.host}:{client.port}/auth/token",service="kura"'
    token = await token_for(client)  # anonymous, no scope
    assert (await client.get("/v2/", headers=bearer(token))).status == 200


async def test_challenge_names_scope(make_auth_client):
    client = await make_auth_client("token")
    r = await client.post("/v2/team/app/blobs/uploads/")
    assert r.status == 401
    assert 'scope="repository:team/app:pull,push"' in r.headers["WWW-Authenticate"]


async def test_token_flow_push_and_pull(make_auth_client):
    client = await make_auth_client("token")
    token = await token_for(client, "repository:team/app:pull,push", user="bob")
    claims = jwt.decode_unverified(token)[1]
    assert claims["sub"] == "bob" and claims["aud"] == "kura" and claims["iss"] == "kura"
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    assert {"exp", "nbf", "iat", "jti"} <= set(claims)
    digest = await push_with(client, bearer(token))
    r = await client.get(f"/v2/team/app/manifests/{digest}", headers=bearer(token))
    assert r.status == 200


async def test_scopes_not_allowed_are_dropped(make_auth_client):
    client = await make_auth_client("token")
    token = await token_for(client, "repository:team/app:pull,push,delete", "repository:carol/x:pull", user="bob")
    access = jwt.decode_unverified(token)[1]["access"]
    assert access == [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    anonymous = await token_for(client, "repository:team/app:pull", "repository:public/lib:pull,push")
    assert jwt.decode_unverified(anonymous)[1]["access"] == [
        {"type": "repository", "name": "public/lib", "actions": ["pull"]}]


async def test_scopes_for_invalid_repository_names_are_dropped(make_auth_client):
    """Other registries trust these tokens and may resolve `..` or fold case: a name outside
    the distribution-spec grammar is never signed, though the rule globs would match it."""
    client = await make_auth_client("token")
    invalid = ["public/../carol/secret", "public/./lib", "public//lib", "public/Lib", "public/lib/",
               "public/" + "a" * 250]
    anonymous = await token_for(client, *[f"repository:{name}:pull" for name in invalid], "repository:public/lib:pull")
    assert jwt.decode_unverified(anonymous)[1]["access"] == [
        {"type": "repository", "name": "public/lib", "actions": ["pull"]}]
    carol = await token_for(client, "repository:carol/../team/app:pull,push,delete", "repository:carol/x:pull",
                            user="carol")
    assert jwt.decode_unverified(carol)[1]["access"] == [
        {"type": "repository", "name": "carol/x", "actions": ["pull"]}]
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "carol",
                                               "password": PASSWORDS["carol"],
                                               "scope": "repository:public/../team/app:pull repository:public/lib:pull"})
    assert [a["name"] for a in jwt.decode_unverified((await r.json())["access_token"])[1]["access"]] == ["public/lib"]


async def test_insufficient_scope(make_auth_client):
    client = await make_auth_client("token")
    token = await token_for(client, "repository:team/app:pull", user="bob")
    r = await client.post("/v2/team/app/blobs/uploads/", headers=bearer(token))
    assert r.status == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    other_repo = await token_for(client, "repository:team/other:pull,push", user="bob")
    r = await client.get("/v2/team/app/tags/list", headers=bearer(other_repo))
    assert r.status == 401 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]


async def test_delete_needs_delete_action(make_auth_client):
    client = await make_auth_client("token")
    token = await token_for(client, "repository:team/app:pull,push,delete", user="alice")
    digest = await push_with(client, bearer(token))
    bob = await token_for(client, "repository:team/app:pull,push,delete", user="bob")
    assert (await client.delete(f"/v2/team/app/manifests/{digest}", headers=bearer(bob))).status == 401
    assert (await client.delete(f"/v2/team/app/manifests/{digest}", headers=bearer(token))).status == 202


async def test_delete_in_repository_named_like_an_upload_path(make_auth_client):
    client = await make_auth_client("token")
    bob = await token_for(client, "repository:team/blobs/uploads/x:pull,push,delete", user="bob")
    digest = await push_with(client, bearer(bob), repo="team/blobs/uploads/x")
    r = await client.delete(f"/v2/team/blobs/uploads/x/manifests/{digest}", headers=bearer(bob))
    assert r.status == 401 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]


async def test_forged_tokens_refused(make_auth_client, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    client = await make_auth_client("token")
    good = await token_for(client, "repository:team/app:pull", user="bob")
    head, payload, signature = good.split(".")
    claims = jwt.decode_unverified(good)[1]
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = {
        "alg none": ".".join([jwt.b64url(b'{"alg":"none","typ":"JWT"}'), payload, ""]),
        "wrong key": jwt.sign(claims, other_key),
        "expired": None, "wrong audience": None, "wrong issuer": None,
        "truncated signature": f"{head}.{payload}.{signature[:20]}",
        "edited claims": f"{head}.{jwt.b64url(json.dumps({**claims, 'sub': 'alice'}).encode())}.{signature}",
    }
    state_key = client.app[AUTH].signing_key
    for label, change in (("expired", {"exp": claims["iat"] - 3600}), ("wrong audience", {"aud": "other"}),
                          ("wrong issuer", {"iss": "other"})):
        forged[label] = jwt.sign({**claims, **change}, state_key.private_key, kid=state_key.kid)
    for label, token in forged.items():
        r = await client.get("/v2/team/app/tags/list", headers=bearer(token))
        assert r.status == 401, label
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], label


async def test_oauth2_post_and_refresh(make_auth_client):
    client = await make_auth_client("token")
    r = await client.post("/auth/token", data={
        "grant_type": "password", "username": "bob", "password": PASSWORDS["bob"], "client_id": "containerd",
        "service": "kura", "scope": "repository:team/app:pull repository:team/app:push", "access_type": "offline"})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert {"access_token", "expires_in", "issued_at", "refresh_token"} <= set(body)
    assert jwt.decode_unverified(body["access_token"])[1]["access"][0]["actions"] == ["pull", "push"]
    # The refresh token is not an access token.
    r = await client.get("/v2/team/app/tags/list", headers=bearer(body["refresh_token"]))
    assert r.status == 401
    r = await client.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"],
                                               "service": "kura", "scope": "repository:team/app:pull"})
    assert r.status == 200
    assert jwt.decode_unverified((await r.json())["access_token"])[1]["sub"] == "bob"
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob", "password": "nope",
                                               "service": "kura"})
    assert r.status == 401
    r = await client.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": "x.y.z"})
    assert r.status == 401
    r = await client.post("/auth/token", data={"grant_type": "client_credentials"})
    assert r.status == 400


async def test_offline_token_on_get(make_auth_client):
    client = await make_auth_client("token")
    r = await client.get("/auth/token", params={"service": "kura", "offline_token": "true"}, headers=basic("bob"))
    assert "refresh_token" in await r.json()
    r = await client.get("/auth/token", params={"service": "kura", "offline_token": "true"})
    assert "refresh_token" not in await r.json()  # anonymous gets none


async def test_wrong_password_and_wrong_service(make_auth_client):
    client = await make_auth_client("token")
    r = await client.get("/auth/token", params={"service": "kura"}, headers=basic("bob", "wrong"))
    assert r.status == 401
    r = await client.get("/auth/token", params={"service": "kura"}, headers=basic("mallory", "x"))
    assert r.status == 401
    r = await client.get("/auth/token", params={"service": "elsewhere"}, headers=basic("bob"))
    assert r.status == 400


async def test_failed_logins_are_slowed_down(make_auth_client):
    client = await make_auth_client("token", login_attempts=3, login_window_seconds=60)
    for _ in range(3):
        r = await client.get("/auth/token", params={"service": "kura"}, headers=basic("bob", "wrong"))
        assert r.status == 401
    r = await client.get("/auth/token", params={"service": "kura"}, headers=basic("bob"))
    assert r.status == 429 and await error_code(r) == "TOOMANYREQUESTS"
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                               "password": PASSWORDS["bob"]})
    assert r.status == 429
    # Guessing at bob's password does not lock alice out.
    r = await client.get("/auth/token", params={"service": "kura"}, headers=basic("alice"))
    assert r.status == 200


async def test_parallel_guesses_are_counted(make_auth_client):
    client = await make_auth_client("token", login_attempts=5)
    responses = await asyncio.gather(*[client.get("/auth/token", params={"service": "kura"},
                                                  headers=basic("bob", f"guess-{i}")) for i in range(30)])
    statuses = [r.status for r in responses]
    assert statuses.count(401) == 5 and statuses.count(429) == 25


@pytest.mark.parametrize("mode", ["token", "htpasswd"])
async def test_parallel_right_passwords_all_succeed(make_auth_client, mode):
    """Checks still running are not failures: a client opening many connections at once
    (skopeo, containerd pulling layers in parallel) is not slowed down for knowing its password."""
    client = await make_auth_client(mode, login_attempts=5)
    path = "/auth/token" if mode == "token" else "/v2/"
    responses = await asyncio.gather(*[client.get(path, headers=basic("bob")) for _ in range(12)])
    assert [r.status for r in responses] == [200] * 12
    # ...and they left no trace: bob still has all his tries for a typo.
    for _ in range(5):
        assert (await client.get(path, headers=basic("bob", "typo"))).status == 401
    assert (await client.get(path, headers=basic("bob"))).status == 429


async def test_failed_logins_counted_per_forwarded_client(make_auth_client):
    """Behind a trusted reverse proxy the limiter keys on the client the proxy saw (the
    right-most X-Forwarded-For address that is not a trusted proxy), not on the proxy."""
    client = await make_auth_client("token", login_attempts=3)  # 127.0.0.1, the test client, is trusted
    attacker = {"X-Forwarded-For": "203.0.113.5"}
    for _ in range(3):
        r = await client.get("/auth/token", headers={**basic("bob", "guess"), **attacker})
        assert r.status == 401
    assert (await client.get("/auth/token", headers={**basic("bob"), **attacker})).status == 429
    # Whatever the attacker writes to the left of what the proxy appended changes nothing...
    spoofed = {"X-Forwarded-For": "198.51.100.77, 203.0.113.5"}
    assert (await client.get("/auth/token", headers={**basic("bob"), **spoofed})).status == 429
    # ...nor does a second trusted proxy in the chain.
    chained = {"X-Forwarded-For": "203.0.113.5, 127.0.0.1"}
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                               "password": PASSWORDS["bob"]}, headers=chained)
    assert r.status == 429
    # The real bob, another client behind the same proxy, is not locked out.
    bob = {"X-Forwarded-For": "198.51.100.20"}
    assert (await client.get("/auth/token", headers={**basic("bob"), **bob})).status == 200
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                               "password": PASSWORDS["bob"]}, headers=bob)
    assert r.status == 200


async def test_rotating_forwarded_for_through_a_proxy_is_still_bounded(make_auth_client):
    """A proxy (or tunnel) that passes the client's own X-Forwarded-For on unchanged must not
    give unlimited guesses: all failures through one proxy are bounded too (PROXY_FACTOR x)."""
    from registry.auth.ratelimit import PROXY_FACTOR
    client = await make_auth_client("htpasswd", login_attempts=1)
    for n in range(PROXY_FACTOR):
        r = await client.get("/v2/", headers={**basic("bob", "guess"), "X-Forwarded-For": f"10.{n // 250}.{n % 250}.1"})
        assert r.status == 401, n
    r = await client.get("/v2/", headers={**basic("bob", "guess"), "X-Forwarded-For": "203.0.113.99"})
    assert r.status == 429 and int(r.headers["Retry-After"]) > 0


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_auth_client):
    client = await make_auth_client("htpasswd", login_attempts=3, trusted_proxies=[])
    for n in range(3):  # a new made-up address each time does not buy more guesses
        r = await client.get("/v2/", headers={**basic("bob", "guess"), "X-Forwarded-For": f"203.0.113.{n}"})
        assert r.status == 401
    r = await client.get("/v2/", headers={**basic("bob"), "X-Forwarded-For": "198.51.100.20"})
    assert r.status == 429


async def test_own_login_does_not_reset_someone_elses_count(make_auth_client):
    client = await make_auth_client("token", login_attempts=3)
    for _ in range(3):
        assert (await client.get("/auth/token", headers=basic("bob", "wrong"))).status == 401
        assert (await client.get("/auth/token", headers=basic("carol"))).status == 200
    assert (await client.get("/auth/token", headers=basic("bob", "wrong"))).status == 429


async def test_overlong_password_is_a_failed_login(make_auth_client):
    client = await make_auth_client("token")
    r = await client.get("/auth/token", headers=basic("bob", "x" * 100))
    assert r.status == 401


async def test_refresh_token_dies_with_the_password(make_auth_client, config):
    client = await make_auth_client("token")
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob",
                                               "password": PASSWORDS["bob"], "access_type": "offline"})
    refresh = (await r.json())["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "access_type": "offline"}
    r = await client.post("/auth/token", data=form)
    assert r.status == 200 and "refresh_token" not in await r.json()  # not renewable by itself
    htpasswd.set_user(config.root / "auth" / "htpasswd", "bob", "a-new-password", cost=4)
    r = await client.post("/auth/token", data=form)
    assert r.status == 401


async def test_slow_login_does_not_stall_other_requests(make_auth_client, config):
    client = await make_auth_client("token")
    htpasswd.set_user(config.root / "auth" / "htpasswd", "slow", "slow-password", cost=14)
    login = asyncio.create_task(client.get("/auth/token", params={"service": "kura"},
                                           headers={"Authorization": "Basic " + base64.b64encode(b"slow:slow-password").decode()}))
    await asyncio.sleep(0.05)
    r = await client.get("/v2/")  # answered while bcrypt still runs in its thread
    assert r.status == 401
    assert not login.done()
    assert (await login).status == 200


async def test_catalog_only_shows_pullable_repositories(make_auth_client):
    client = await make_auth_client("token")
    alice = await token_for(client, "repository:team/app:pull,push", user="alice")
    await push_with(client, bearer(alice))
    carol = await token_for(client, "repository:carol/x:pull,push", user="carol")
    await push_with(client, bearer(carol), repo="carol/x")
    for user, visible in (("alice", ["team/app"]), ("carol", ["carol/x"])):
        token = await token_for(client, "registry:catalog:*", user=user)
        r = await client.get("/v2/_catalog", headers=bearer(token))
        assert (await r.json())["repositories"] == visible, user
    anonymous = await token_for(client, "registry:catalog:*")
    assert (await client.get("/v2/_catalog", headers=bearer(anonymous))).status == 401


async def test_upload_session_bound_to_its_user(make_auth_client):
    client = await make_auth_client("token")
    alice = await token_for(client, "repository:team/app:pull,push", user="alice")
    bob = await token_for(client, "repository:team/app:pull,push", user="bob")
    r = await client.post("/v2/team/app/blobs/uploads/", headers=bearer(alice))
    location = r.headers["Location"]
    r = await client.patch(location, data=b"bob's bytes", headers=bearer(bob))
    assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    assert (await client.get(location, headers=bearer(bob))).status == 404
    assert (await client.patch(location, data=b"alice", headers=bearer(alice))).status == 202


async def test_mount_needs_pull_on_source(make_auth_client):
    client = await make_auth_client("token")
    carol = await token_for(client, "repository:carol/x:pull,push", user="carol")
    await push_with(client, bearer(carol), repo="carol/x", data=b"carol's layer")
    layer = sha256(b"carol's layer")
    bob = await token_for(client, "repository:team/app:pull,push", "repository:carol/x:pull", user="bob")
    r = await client.post(f"/v2/team/app/blobs/uploads/?mount={layer}&from=carol/x", headers=bearer(bob))
    assert r.status == 202  # not mounted: bob may not read carol/x
    r = await client.post(f"/v2/team/app/blobs/uploads/?mount={layer}", headers=bearer(bob))
    assert r.status == 202  # nor found through a repository bob can read
    carol = await token_for(client, "repository:public/lib:pull,push", "repository:carol/x:pull", user="carol")
    r = await client.post(f"/v2/public/lib/blobs/uploads/?mount={layer}&from=carol/x", headers=bearer(carol))
    assert r.status == 201


def challenge_scope(response) -> str:
    return re.search(r'scope="([^"]*)"', response.headers["WWW-Authenticate"]).group(1)


async def test_mount_challenge_asks_for_pull_on_the_source(make_auth_client):
    """Clients that take their scope from the challenge (python-dxf, containerd) must be told
    about the source repository, or they never get pull there and silently upload instead.
    One scope parameter, space-separated, as CNCF distribution writes it."""
    client = await make_auth_client("token")
    carol = await token_for(client, "repository:carol/x:pull,push", user="carol")
    await push_with(client, bearer(carol), repo="carol/x", data=b"carol's layer")
    layer = sha256(b"carol's layer")
    mount = f"/v2/public/lib/blobs/uploads/?mount={layer}&from=carol/x"
    r = await client.post(mount)
    assert r.status == 401
    scope = challenge_scope(r)
    assert scope == "repository:public/lib:pull,push repository:carol/x:pull"
    token = await token_for(client, scope, user="carol")  # what a challenge-driven client asks for
    r = await client.post(mount, headers=bearer(token))
    assert r.status == 201, await r.text()
    assert (await client.head(f"/v2/public/lib/blobs/{layer}", headers=bearer(token))).status == 200
    # A token without the source pull: the insufficient_scope challenge names it too.
    r = await client.post(mount, headers=bearer(await token_for(client, "repository:public/lib:pull", user="carol")))
    assert r.status == 401 and challenge_scope(r) == scope
    # Only a mount names a source, and only a valid one; the target is not repeated.
    for query, expected in (("?from=carol/x", "repository:public/lib:pull,push"),
                            (f"?mount={layer}&from=carol/../x", "repository:public/lib:pull,push"),
                            (f"?mount={layer}&from=public/lib", "repository:public/lib:pull,push")):
        assert challenge_scope(await client.post(f"/v2/public/lib/blobs/uploads/{query}")) == expected, query


async def test_reverse_proxy_headers_shape_the_realm(make_auth_client):
    client = await make_auth_client("token")
    r = await client.get("/v2/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example",
                                          "X-Forwarded-Prefix": "/kura"})
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="https://registry.example/kura/auth/token"')


async def test_forwarded_headers_ignored_from_untrusted_clients(make_auth_client):
    client = await make_auth_client("token", trusted_proxies=[])
    r = await client.get("/v2/", headers={"X-Forwarded-Host": 'evil.example/x",service="evil'})
    assert r.headers["WWW-Authenticate"].startswith(f'Bearer realm="http://{client.host}:{client.port}/auth/token"')
    trusting = await make_auth_client("token")
    r = await trusting.get("/v2/", headers={"X-Forwarded-Host": 'evil.example/x",service="evil'})
    assert "evil" not in r.headers["WWW-Authenticate"]  # a trusted proxy still cannot inject quotes


async def test_configured_realm_wins(make_auth_client):
    client = await make_auth_client("token", realm="https://auth.example/token", service="registry.example")
    r = await client.get("/v2/")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="https://auth.example/token",service="registry.example"'


async def test_htpasswd_mode(make_auth_client):
    client = await make_auth_client("htpasswd")
    r = await client.get("/v2/")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert (await client.get("/v2/", headers=basic("bob"))).status == 200
    assert (await client.get("/v2/", headers=basic("bob", "wrong"))).status == 401
    await push_with(client, basic("bob"))
    r = await client.post("/v2/carol/x/blobs/uploads/", headers=basic("bob"))
    assert r.status == 403 and await error_code(r) == "DENIED"
    r = await client.post("/v2/public/lib/blobs/uploads/")
    assert r.status == 401  # anonymous may only pull public/**
    await push_with(client, basic("carol"), repo="public/lib")
    assert (await client.get("/v2/public/lib/tags/list")).status == 200
    assert (await client.get("/v2/team/app/tags/list")).status == 401
    assert (await (await client.get("/v2/_catalog", headers=basic("carol"))).json())["repositories"] == ["public/lib"]


async def test_no_auth_token_endpoint_absent(client):
    assert (await client.get("/auth/token")).status == 404


async def test_secrets_never_logged(make_auth_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = await make_auth_client("token")
    r = await client.post("/auth/token", data={"grant_type": "password", "username": "bob", "password": PASSWORDS["bob"],
                                               "access_type": "offline", "service": "kura"})
    body = await r.json()
    await client.get("/auth/token", params={"service": "kura"}, headers=basic("bob", "typo-" + PASSWORDS["bob"]))
    await client.get("/v2/", headers=bearer(body["access_token"]))
    text = caplog.text
    assert "failed login" in text  # the log does speak of logins...
    for secret in (PASSWORDS["bob"], body["access_token"], body["refresh_token"],
                   base64.b64encode(f"bob:{PASSWORDS['bob']}".encode()).decode()):
        assert secret not in text  # ...but never of secrets


async def test_hostile_token_json_is_401_without_a_traceback(make_auth_client, caplog):
    client = await make_auth_client("token")
    deep = jwt.b64url(b"[" * 2000 + b"]" * 2000)
    huge = jwt.b64url(b'{"alg": ' + b"1" * 5000 + b"}")
    header = jwt.b64url(b'{"alg": "ES256"}')
    for token in (f"{deep}.e30.x", f"{header}.{deep}.x", f"{huge}.e30.x", f"{header}.{huge}.x"):
        caplog.clear()
        r = await client.get("/v2/team/app/tags/list", headers=bearer(token))
        assert r.status == 401 and await error_code(r) == "UNAUTHORIZED"
        r = await client.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": token,
                                                   "service": "kura"})
        assert r.status == 401
        assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")]
