"""Access control for registry requests: none, htpasswd (Basic) or token (Bearer).

Token mode (registry/auth/token.py, keys.py, jwt.py) needs `cryptography`, which costs a
server several MiB of memory: it is imported only when that mode is configured."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from ..errors import Denied, TooManyRequests, Unauthorized
from .config import AuthConfig
from .htpasswd import Htpasswd, LoginsBusy
from .ratelimit import Client, LoginLimiter
from .rules import AccessRules
from .scopes import Access, required_access

if TYPE_CHECKING:
    from .keys import SigningKey

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


def covers(grant: Grant, needed: list[Access]) -> bool:
    return all(grant.can(a.type, a.name, action) for a in needed for action in a.actions)


def describe(needed: list[Access]) -> str:
    """What a refused request needed: `pull,push repository:team/app`."""
    return ", ".join(f"{','.join(sorted(a.actions))} {a.type}:{a.name}" for a in needed)


def access_detail(needed: list[Access]) -> list[dict]:
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
        self.on_failure: Callable[[str], None] = lambda reason: None  # told each failure's reason (metrics)

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
            request[SIGNED_IN] = user
            return user
        raise Unauthorized("invalid username or password", headers=challenge)

    async def check(self, address: Client, user: str, password: str) -> bool:
        """True for a right password; False for a wrong one; 429 while slowed down."""
        wait = await self.limiter.begin(address, user)
        if wait:
            log.warning("failed login for user %r from %s: locked out (too many failed logins; "
                        "retry in %d s)", user, address, wait)
            self.on_failure("locked out")
            raise TooManyRequests("too many failed logins; try again later", headers={"Retry-After": str(wait)})
        ok = None
        try:
            ok = bool(user) and await self.htpasswd.check(user, password)
        except LoginsBusy:
            log.warning("login for user %r from %s refused: too many password checks at once", user, address)
            raise TooManyRequests("too many logins at once; try again shortly", headers={"Retry-After": "1"}) from None
        finally:
            self.limiter.end(address, user, ok)
        if not ok:
            reason = "no user name" if not user else "wrong password" if self.htpasswd.exists(user) else "unknown user"
            log.warning("failed login for user %r from %s: %s", user, address, reason)
            self.on_failure(reason)
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
        if user is None and (not needed or not covers(grant, needed)):
            raise Unauthorized(detail=access_detail(needed), headers=self.challenge)
        if not covers(grant, needed):
            log.warning("denied: user %r from %s may not %s", user, self.credentials.address_of(request),
                        describe(needed))
            raise Denied(detail=access_detail(needed))
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
    from .keys import load_or_create, load_trusted_keys
    from .token import TokenAuth

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
SIGNED_IN = web.RequestKey("signed_in", str)  # who logged in on a request without a grant (/auth/token)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    if not request.path.startswith("/v2"):
        return await handler(request)
    request[GRANT] = await request.app[AUTH].controller.authorize(request, required_access(request))
    return await handler(request)


def grant(request: web.Request) -> Grant:
    return request[GRANT]  # set for every /v2 request; a missing grant must fail closed


