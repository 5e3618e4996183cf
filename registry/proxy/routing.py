"""Which proxy, if any, serves a repository name a client asked for.

Clients reach a cached registry four ways, all answered from the same local repository:
  - namespaced: `kura-host/docker.io/library/redis` (the proxy whose prefix is `docker.io`);
  - as a root mirror: docker's `registry-mirrors` asks the mirror for `library/redis`;
  - containerd's hosts.toml mirrors add `?ns=docker.io` to a plain `library/redis` (and to
    `docker.io/library/redis` when the mirror is given with that path);
  - single names (`docker.io/redis`) are `library/redis` on Docker Hub, as docker reads them.
The longest matching prefix wins; a proxy whose `repositories` globs exclude the name leaves it to
a shorter prefix, and a name no proxy serves is an ordinary private repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ocispec.names import is_valid_name

from .config import Proxy


@dataclass(frozen=True)
class Route:
    proxy: Proxy
    local_name: str
    """The repository in Kura's store."""
    upstream_name: str
    """The repository on the upstream registry."""


class Router:
    def __init__(self, proxies: tuple[Proxy, ...]):
        self.proxies = tuple(sorted(proxies, key=lambda p: len(p.prefix), reverse=True))
        self._by_prefix = {proxy.prefix: proxy for proxy in proxies}

    def __bool__(self) -> bool:
        return bool(self.proxies)

    def route(self, name: str, namespace: str | None = None) -> Route | None:
        if namespace:
            proxy = self._by_prefix.get(namespace.lower())
            if proxy is not None and proxy.prefix:
                # containerd adds ?ns= to a mirror with a path too (`/v2/docker.io/library/redis`).
                rest = name[len(proxy.prefix) + 1:] if name.startswith(proxy.prefix + "/") else name
                found = self._route_to(proxy, rest)
                if found is not None:
                    return found
        for proxy in self.proxies:
            if not proxy.prefix:
                rest = name
            elif name.startswith(proxy.prefix + "/"):
                rest = name[len(proxy.prefix) + 1:]
            else:
                continue
            found = self._route_to(proxy, rest)
            if found is not None:
                return found
        return None

    @staticmethod
    def _route_to(proxy: Proxy, rest: str) -> Route | None:
        upstream = proxy.upstream_name(rest)
        local = proxy.local_name(upstream)
        if not proxy.serves(upstream) or not is_valid_name(local):
            return None
        return Route(proxy, local, upstream)


ROUTE = web.RequestKey("proxy_route", Route)
"""Set on a request for a name a proxy serves."""


def proxy_route(request: web.Request) -> Route | None:
    return request.get(ROUTE)
