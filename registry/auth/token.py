"""Token (Bearer) access control: a request is allowed what a valid token grants."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from ..errors import Unauthorized
from . import jwt
from .controller import Controller, Grant, access_detail, client_address, covers, describe, public_base
from .rules import AccessRules
from .scopes import Access, mount_source

log = logging.getLogger("kura.auth")


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
            raise Unauthorized(detail=access_detail(needed), headers=self.challenge(request, needed))
        try:
            claims = jwt.verify(header[7:].strip(), self.public_keys, audience=self.service, issuer=self.issuer)
        except jwt.TokenError as exc:
            log.warning("refused a token from %s: %s", client_address(request, self.trusted_proxies), exc)
            raise Unauthorized(f"invalid token: {exc}",
                               headers=self.challenge(request, needed, "invalid_token")) from None
        access = claims.get("access") if isinstance(claims.get("access"), list) else []
        grant = TokenGrant([a for a in access if isinstance(a, dict)], self.rules, claims.get("sub") or None)
        if not covers(grant, needed):
            log.warning("denied: user %r from %s may not %s (not in the token)", grant.user,
                        client_address(request, self.trusted_proxies), describe(needed))
            raise Unauthorized("the token does not grant this access", detail=access_detail(needed),
                               headers=self.challenge(request, needed, "insufficient_scope"))
        return grant
