"""Docker token-auth scopes (`repository:library/redis:pull,push`) and what a request needs."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ocispec.names import is_valid_name


@dataclass(frozen=True)
class Access:
    type: str  # "repository" or "registry"
    name: str
    actions: frozenset[str]

    def scope(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"

    def claim(self) -> dict:
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}


CATALOG = Access("registry", "catalog", frozenset({"*"}))


def parse_scope(text: str) -> Access | None:
    """`type[(class)]:name:actions`; the name may itself hold colons. None when malformed,
    which includes a repository name outside the distribution-spec grammar (`a/../b`): other
    registries trust our tokens and might resolve such a name to another repository."""
    resource_type, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name or not resource_type:
        return None
    resource_type = resource_type.split("(", 1)[0]
    if resource_type == "repository" and not is_valid_name(name):
        return None
    return Access(resource_type, name, frozenset(a for a in actions.split(",") if a))


def parse_scopes(values: list[str]) -> list[Access]:
    """Scopes from repeated `scope=` parameters, each possibly space-separated (OAuth2 form)."""
    merged: dict[tuple[str, str], set[str]] = {}
    for value in values:
        for text in value.split():
            access = parse_scope(text)
            if access is not None:
                merged.setdefault((access.type, access.name), set()).update(access.actions)
    return [Access(t, n, frozenset(a)) for (t, n), a in merged.items()]


def required_access(request: web.Request) -> list[Access]:
    """What this registry request needs; [] for the `/v2/` check (authentication only)."""
    if request.path.rstrip("/") == "/v2":
        return []
    if request.path == "/v2/_catalog":
        return [CATALOG]
    name = request.match_info.get("name")
    if name is None:
        return []
    if request.method in ("GET", "HEAD"):
        actions = {"pull"}
    elif request.method == "DELETE" and "uuid" not in request.match_info:  # cancelling an upload is a push
        actions = {"delete"}
    else:
        actions = {"pull", "push"}
    return [Access("repository", name, frozenset(actions))]


def mount_source(request: web.Request) -> list[Access]:
    """Pull on the source of a cross-repository mount (`POST .../blobs/uploads/?mount=&from=`).
    Not required (without it the registry starts an ordinary upload), but asked for in the
    challenge, so clients that take their scope from it can mount."""
    name, source = request.match_info.get("name"), request.query.get("from")
    if request.method != "POST" or name is None or "mount" not in request.query \
            or not source or source == name or not is_valid_name(source):
        return []
    return [Access("repository", source, frozenset({"pull"}))]
