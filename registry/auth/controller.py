"""Access control for registry requests: none, htpasswd (Basic) or token (Bearer)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..errors import Denied, TooManyRequests, Unauthorized
from . import jwt
from .config import AuthConfig
from .htpasswd import Htpasswd, LoginsBusy
from .keys import SigningKey, load_or_create, load_trusted_keys
from .ratelimit import Client, LoginLimiter
from .rules import AccessRules
from .scopes import Access, mount_source, required_access

log = logging.getLogger("kura.auth")


class Grant:
    """What the caller of one request may do."""
    user = None  # the signed-in user, None when anonymous

    def can(self, resource_type: str, name: str, action: str) -> bool:
        raise NotImplementedError

    def may_list(self, repository: str) -> bool:
        """Whether the repository shows in the catalog for this caller."""
        return self.can("repository", repository, "pull")

    def may_pull_alias(self, repository: str) -> bool:
        """Whether this caller may pull `repository`, reached through another name (the
        pull-through cache's `?ns=` and `docker.io/redis` for `docker.io/library/redis`)."""
        return self.can("repository", repository, "pull")


class Everything(Grant):
    def can(self, resource_type: str, name: str, action: str) -> bool:
        return True


@dataclass
class RulesGrant(Grant):
    rules: AccessRules
    user: str | None

    def can(self, resource_type: str, name: str, action: str) -> bool:
        return bool(self.rules.allowed(self.user, resource_type, name, {action}))


@dataclass
class TokenGrant(Grant):
    access: list[dict]
    rules: AccessRules | None  # our own issuer's rules, to filter the catalog by identity
    user: str | None

    def can(self, resource_type: str, name: str, action: str) -> bool:
        for entry in self.access:
            if entry.get("type") == resource_type and entry.get("name") == name:
                actions = entry.get("actions") or []
                if action in actions or "*" in actions:
                    return True
        return False

    def may_list(self, repository: str) -> bool:
        if self.rules is None:
            return True  # an external issuer granted the catalog; we know no finer rules
        return bool(self.rules.allowed(self.user, "repository", repository, {"pull"}))

    def may_pull_alias(self, repository: str) -> bool:
        # The client's token names what it asked for; our own issuer's rules decide the alias
        # for the same identity. An external issuer's tokens grant only what they name.
        if self.can("repository", repository, "pull"):
            return True
        return self.rules is not None and bool(self.rules.allowed(self.user, "repository", repository, {"pull"}))


def _covers(grant: Grant, needed: list[Access]) -> bool:
    return all(grant.can(a.type, a.name, action) for a in needed for action in a.actions)


def _detail(needed: list[Access]) -> list[dict]:
    return [{"Type": a.type, "Name": a.name, "Action": action} for a in needed for action in sorted(a.actions)]


_SAFE_PROTO = re.compile(r"https?")
_SAFE_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]+)?|\[[0-9A-Fa-f:.]+\](?::[0-9]+)?")
_SAFE_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~\-]+)*")


def public_base(request: web.Request, trusted_proxies: frozenset[str]) -> str:
    """The URL clients reach us at. X-Forwarded-Proto/-Host/-Prefix count only when the
    request comes from a trusted proxy, and only values of a plain shape (no quotes)."""
    proto, host, prefix = request.scheme, request.host, ""
    if _trusted(request.remote or "", trusted_proxies):
        def forwarded(name: str, pattern: re.Pattern, default: str) -> str:
            value = request.headers.get(name, "").split(",")[-1].strip()  # the nearest proxy's word
            return value if value and pattern.fullmatch(value) else default
        proto = forwarded("X-Forwarded-Proto", _SAFE_PROTO, proto)
        host = forwarded("X-Forwarded-Host", _SAFE_HOST, host)
        prefix = forwarded("X-Forwarded-Prefix", _SAFE_PREFIX, "").rstrip("/")
    if not _SAFE_HOST.fullmatch(host):
        host = "localhost"
    return f"{proto}://{host}{prefix}"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it (`1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`); None if not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, trusted_proxies: frozenset[str]) -> bool:
    if address in trusted_proxies:
        return True
    ip = _ip(address)
    return ip is not None and any(_ip(proxy) == ip for proxy in trusted_proxies)


def client_address(request: web.Request, trusted_proxies: frozenset[str]) -> Client:
    """Who is logging in: the peer, or when the peer is a trusted proxy, the right-most
    X-Forwarded-For address that is not itself a trusted proxy (whatever is left of it, the
    client could have written), named with the proxy that forwarded it."""
    peer = request.remote or "unknown"
    if not _trusted(peer, trusted_proxies):
        return Client(peer)
    hops = [hop for value in request.headers.getall("X-Forwarded-For", []) for hop in value.split(",")]
    address = peer
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:  # not what a proxy appends: count against the proxy rather than guess
            return Client(peer)
        address = str(ip)
        if not _trusted(address, trusted_proxies):
            break
    return Client(address, peer) if address != peer else Client(peer)


class Credentials:
    """Checks passwords against the htpasswd file, with failed-login slow-down."""

    def __init__(self, htpasswd: Htpasswd, limiter: LoginLimiter, trusted_proxies: frozenset[str] = frozenset()):
        self.htpasswd = htpasswd
        self.limiter = limiter
        self.trusted_proxies = trusted_proxies

    def address_of(self, request: web.Request) -> Client:
        return client_address(request, self.trusted_proxies)

    async def check_basic(self, request: web.Request, header: str, challenge: dict[str, str]) -> str | None:
        """The user named by a `Basic ...` header (None for empty credentials, which some
        clients send when they have none); raises 401 or 429."""
        try:
            decoded = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True).decode()
            user, _, password = decoded.partition(":")
        except (IndexError, binascii.Error, UnicodeDecodeError):
            user, password = "", "invalid"
        if not user and not password:
            return None
        if await self.check(self.address_of(request), user, password):
            return user
        raise Unauthorized("invalid username or password", headers=challenge)

    async def check(self, address: Client, user: str, password: str) -> bool:
        """True for a right password; False for a wrong one; 429 while slowed down."""
        wait = await self.limiter.begin(address, user)
        if wait:
            log.warning("failed login for user %r from %s: locked out (too many failed logins; "
                        "retry in %d s)", user, address, wait)
            raise TooManyRequests("too many failed logins; try again later", headers={"Retry-After": str(wait)})
        ok = None
        try:
            ok = bool(user) and await self.htpasswd.check(user, password)
        except LoginsBusy:
            raise TooManyRequests("too many logins at once; try again shortly", headers={"Retry-After": "1"}) from None
        finally:
            self.limiter.end(address, user, ok)
        if not ok:
            reason = "no user name" if not user else "wrong password" if self.htpasswd.exists(user) else "unknown user"
            log.warning("failed login for user %r from %s: %s", user, address, reason)
        return ok


class Controller:
    async def authorize(self, request: web.Request, needed: list[Access]) -> Grant:
        raise NotImplementedError


class NoAuth(Controller):
    async def authorize(self, request: web.Request, needed: list[Access]) -> Grant:
        return Everything()


class BasicAuth(Controller):
    def __init__(self, credentials: Credentials, rules: AccessRules, realm: str = "kura"):
        self.credentials = credentials
        self.rules = rules
        self.challenge = {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'}

    async def authorize(self, request: web.Request, needed: list[Access]) -> Grant:
        header = request.headers.get("Authorization", "")
        user = None
        if header[:6].lower() == "basic ":
            user = await self.credentials.check_basic(request, header, self.challenge)
        grant = RulesGrant(self.rules, user)
        if user is None and (not needed or not _covers(grant, needed)):
            raise Unauthorized(detail=_detail(needed), headers=self.challenge)
        if not _covers(grant, needed):
            raise Denied(detail=_detail(needed))
        return grant


class TokenAuth(Controller):
    def __init__(self, public_keys: dict, service: str, issuer: str, realm: str | None,
                 rules: AccessRules | None, trusted_proxies: frozenset[str] = frozenset()):
        self.public_keys = public_keys
        self.service = service
        self.issuer = issuer
        self.realm = realm
        self.rules = rules
        self.trusted_proxies = trusted_proxies

    def challenge(self, request: web.Request, needed: list[Access], error: str | None = None) -> dict[str, str]:
        realm = self.realm or f"{public_base(request, self.trusted_proxies)}/auth/token"
        value = f'Bearer realm="{realm}",service="{self.service}"'
        if needed:
            value += f',scope="{" ".join(a.scope() for a in needed + mount_source(request))}"'
        if error:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    async def authorize(self, request: web.Request, needed: list[Access]) -> Grant:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            raise Unauthorized(detail=_detail(needed), headers=self.challenge(request, needed))
        try:
            claims = jwt.verify(header[7:].strip(), self.public_keys, audience=self.service, issuer=self.issuer)
        except jwt.TokenError as exc:
            raise Unauthorized(f"invalid token: {exc}",
                               headers=self.challenge(request, needed, "invalid_token")) from None
        access = claims.get("access") if isinstance(claims.get("access"), list) else []
        grant = TokenGrant([a for a in access if isinstance(a, dict)], self.rules, claims.get("sub") or None)
        if not _covers(grant, needed):
            raise Unauthorized("the token does not grant this access", detail=_detail(needed),
                               headers=self.challenge(request, needed, "insufficient_scope"))
        return grant


@dataclass
class AuthState:
    controller: Controller
    credentials: Credentials | None = None
    signing_key: SigningKey | None = None
    config: AuthConfig | None = None


class AuthSetupError(Exception):
    """Authentication cannot be set up (a key that cannot be created or read): one line."""


def _file_error(exc: OSError, what: str, default: Path) -> AuthSetupError:
    path = Path(exc.filename) if exc.filename else default
    verb = "read" if path.exists() else "create"
    text = os.strerror(exc.errno) if isinstance(exc.errno, int) else str(exc)
    return AuthSetupError(f"cannot {verb} {what} {path}: {text[:1].lower()}{text[1:]}")


def build(config: AuthConfig, root: Path) -> AuthState:
    try:
        return _build(config, root)
    except AuthSetupError:
        raise
    except OSError as exc:
        key_path, cert_path = config.key_paths(root)
        if config.external is not None:
            raise _file_error(exc, "the trusted issuer's keys", config.external.certificate or config.external.jwks)
        what = "the token signing certificate" if exc.filename == str(cert_path) else "the token signing key"
        raise _file_error(exc, what, key_path) from None
    except ValueError as exc:
        where = "auth.external" if config.external is not None else "token signing key"
        raise AuthSetupError(f"{where}: {exc}") from None


def _build(config: AuthConfig, root: Path) -> AuthState:
    if config.mode == "none":
        return AuthState(NoAuth(), config=config)
    limiter = LoginLimiter(config.login_attempts, config.login_window_seconds)
    credentials = Credentials(Htpasswd(config.htpasswd_path(root)), limiter, config.trusted_proxies)
    if config.mode == "htpasswd":
        return AuthState(BasicAuth(credentials, config.rules), credentials, config=config)
    if config.external is not None:
        ext = config.external
        keys = load_trusted_keys(ext.certificate, ext.jwks)
        if not keys:
            raise AuthSetupError("auth.external: no usable public key found")
        return AuthState(TokenAuth(keys, ext.service, ext.issuer, ext.realm, None), config=config)
    key_path, cert_path = config.key_paths(root)
    signing_key = load_or_create(key_path, cert_path, config.algorithm, config.issuer)
    controller = TokenAuth(signing_key.public_keys, config.service, config.issuer, config.realm, config.rules,
                           config.trusted_proxies)
    return AuthState(controller, credentials, signing_key, config)


def startup_report(state: AuthState, listen: str, plain_http_off_loopback: bool) -> list[tuple[int, str]]:
    """What `kura serve` logs about access control once it listens (may raise OSError when
    the accounts file cannot be read)."""
    config = state.config
    if config is None or config.mode == "none":
        return [(logging.INFO, "auth: none (anyone who can reach the server may pull, push and delete)")]
    if config.external is not None:
        ext = config.external
        notes = [(logging.INFO, f"auth: token mode, trusting tokens of issuer {ext.issuer!r} for service "
                                f"{ext.service!r} ({len(state.controller.public_keys)} key(s))")]
    else:
        path = state.credentials.htpasswd.path
        count = len(state.credentials.htpasswd.users())
        notes = [(logging.INFO, f"auth: {config.mode} mode, {count} account{'' if count == 1 else 's'} from {path}")]
        if count == 0 and not any(rule.anonymous for rule in config.rules.rules):
            notes.append((logging.WARNING, f"auth: no accounts in {path} and no rule for anonymous users: nobody "
                                           "can pull or push. Add one with `kura user add NAME` and the same "
                                           "--config (or --root) as `kura serve` (no restart needed)"))
    if plain_http_off_loopback:
        notes.append((logging.WARNING, f"auth: serving plain HTTP on {listen}: passwords and tokens cross the "
                                       "network in clear. Set server.tls_cert and server.tls_key, or listen on "
                                       "127.0.0.1 behind a TLS proxy"))
    return notes


AUTH = web.AppKey("auth", AuthState)
GRANT = web.RequestKey("grant", Grant)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    if not request.path.startswith("/v2"):
        return await handler(request)
    request[GRANT] = await request.app[AUTH].controller.authorize(request, required_access(request))
    return await handler(request)


def grant(request: web.Request) -> Grant:
    return request[GRANT]  # set for every /v2 request; a missing grant must fail closed


