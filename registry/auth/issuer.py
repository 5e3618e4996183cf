"""The token issuer at `/auth/token` (Docker registry token authentication).

GET with optional Basic credentials (`service`, `scope`..., `offline_token`), and the OAuth2
form POST (`grant_type=password|refresh_token`) that containerd tries first. Scopes the
caller may not have are dropped from the token, not refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid

from aiohttp import web

from ..errors import RegistryError, Unauthorized
from . import jwt
from .controller import AUTH, SIGNED_IN, AuthState
from .scopes import Access, parse_scopes

log = logging.getLogger("kura.auth")

REFRESH = "refresh"


class TokenRequestInvalid(RegistryError):
    code = "UNSUPPORTED"
    status = 400
    message = "invalid token request"


def _issue(state: AuthState, user: str | None, requested: list[Access], offline: bool) -> dict:
    """An access token (and, when `offline`, a refresh token tied to the current password)."""
    config = state.config
    rules = config.rules
    granted = []
    for access in requested:
        actions = rules.allowed(user, access.type, access.name, set(access.actions))
        if actions:
            granted.append(Access(access.type, access.name, frozenset(actions)))
    now = int(time.time())
    claims = {
        "iss": config.issuer, "sub": user or "", "aud": config.service,
        "exp": now + config.token_ttl_seconds, "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
        "access": [a.claim() for a in granted],
    }
    key = state.signing_key
    token = jwt.sign(claims, key.private_key, kid=key.kid, certificate=key.certificate)
    body = {
        "token": token, "access_token": token, "expires_in": config.token_ttl_seconds,
        "issued_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
        "scope": " ".join(a.scope() for a in granted),
    }
    if offline and user is not None:
        body["refresh_token"] = jwt.sign({
            "iss": config.issuer, "sub": user, "aud": f"{config.service}:{REFRESH}",
            "exp": now + config.refresh_ttl_seconds, "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "pwd": state.credentials.htpasswd.fingerprint(user),
        }, key.private_key, kid=key.kid)
    return body


def _check_service(state: AuthState, service: str | None) -> None:
    if service is not None and service != state.config.service:
        raise TokenRequestInvalid(f"this issuer serves {state.config.service!r}, not {service!r}")


def _response(body: dict) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def get_token(request: web.Request) -> web.Response:
    state = request.app[AUTH]
    query = request.rel_url.query
    _check_service(state, query.get("service"))
    user = None
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        user = await state.credentials.check_basic(request, header, {"WWW-Authenticate": 'Basic realm="kura"'})
    offline = query.get("offline_token", "").lower() == "true"
    return _response(_issue(state, user, parse_scopes(query.getall("scope", [])), offline))


async def post_token(request: web.Request) -> web.Response:
    state = request.app[AUTH]
    form = await request.post()
    _check_service(state, form.get("service"))
    grant_type = form.get("grant_type")
    address = state.credentials.address_of(request)
    if grant_type == "password":
        user, password = form.get("username") or "", form.get("password")
        if not user or password is None or not await state.credentials.check(address, user, password):
            raise Unauthorized("invalid username or password")
    elif grant_type == "refresh_token":
        try:
            user = _refresh_subject(state, form.get("refresh_token") or "")
        except Unauthorized as exc:
            log.warning("refused a refresh token from %s: %s", address, exc.text)
            raise
    else:
        raise TokenRequestInvalid("grant_type must be password or refresh_token")
    request[SIGNED_IN] = user
    # A refresh token is not renewed by itself: its lifetime is the most a stolen one buys.
    offline = form.get("access_type") == "offline" and grant_type == "password"
    return _response(_issue(state, user, parse_scopes(form.getall("scope", [])), offline))


def _refresh_subject(state: AuthState, token: str) -> str:
    config = state.config
    try:
        claims = jwt.verify(token, state.signing_key.public_keys, audience=f"{config.service}:{REFRESH}",
                            issuer=config.issuer)
    except jwt.TokenError as exc:
        raise Unauthorized(f"invalid refresh token: {exc}") from None
    user = claims.get("sub")
    if not isinstance(user, str) or claims.get("pwd") is None \
            or claims.get("pwd") != state.credentials.htpasswd.fingerprint(user):
        raise Unauthorized("the refresh token is no longer valid; log in again")
    return user


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/auth/token", get_token)
    app.router.add_post("/auth/token", post_token)
