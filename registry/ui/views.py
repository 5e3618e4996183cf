"""The web UI's pages and actions. Each checks what the viewer may do with the registry's own
access rules: pull to see a repository, delete to delete a tag. Imported on the first request
for a page (with jinja2 and aiohttp_jinja2), not by a server that never serves one."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from ocispec.digest import Digest, InvalidDigest
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest
from ocispec.names import is_valid_name, is_valid_tag
from storage import ManifestNotFound, manifests

from ..auth.controller import AUTH, Everything, Grant, RulesGrant
from ..auth.htpasswd import valid_user_name
from ..context import CONFIG, STORAGE
from ..errors import RegistryError
from ..notify import events as notify
from ..proxy.front import PROXY
from .render import TEMPLATES
from .session import Session
from .state import NEW_SESSION, SESSION, UI
from .urls import here, registry_host, ui_root

log = logging.getLogger("kura.ui")

REPOSITORIES_PER_PAGE = 50
TAGS_PER_PAGE = 100
RAW_MANIFEST_SHOWN = 64 << 10
REFERRERS_SHOWN = 500  # the first, by digest (the API's referrers listing has them all)


@dataclass(frozen=True)
class Viewer:
    user: str | None
    grant: Grant
    can_sign_in: bool
    auth_on: bool

    def may_pull(self, repository: str) -> bool:
        return self.grant.can("repository", repository, "pull")


def viewer(request: web.Request) -> Viewer:
    state = request.config_dict[AUTH]
    config = state.config
    if config is None or config.mode == "none":
        return Viewer(None, Everything(), False, False)
    user = request[SESSION].user
    return Viewer(user, RulesGrant(config.rules, user), state.credentials is not None, True)


def may_delete(request: web.Request, who: Viewer, repository: str) -> str | None:
    """Why `who` may not delete tags of `repository` (None: they may)."""
    if not request.config_dict[CONFIG].delete_enabled:
        return "Deletes are disabled on this registry."
    proxy = request.config_dict.get(PROXY)
    if proxy is not None and proxy.router.route(repository) is not None:
        return f"{repository} is a cached copy served by the pull-through cache: it is read-only."
    if not who.grant.can("repository", repository, "delete"):
        if who.user is None and who.auth_on:
            return "Sign in to delete tags."
        return f"You may not delete tags of {repository}."
    return None


def _page_number(request: web.Request) -> int:
    text = request.query.get("page", "1")
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) < 10**6 else 1


def _pages(request: web.Request, total: int, per_page: int, **params: str) -> dict:
    count = max(1, math.ceil(total / per_page))
    number = min(_page_number(request), count)

    def link(page: int) -> str:
        query = {key: value for key, value in params.items() if value}
        if page > 1:
            query["page"] = str(page)
        return here(request) + ("?" + urlencode(query) if query else "")

    return {"number": number, "count": count, "start": (number - 1) * per_page, "end": number * per_page,
            "previous": link(number - 1) if number > 1 else None, "next": link(number + 1) if number < count else None}


def render(template: str, request: web.Request, context: dict, status: int = 200) -> web.Response:
    who = viewer(request)
    state = request.config_dict[UI]
    base = {"root": ui_root(request), "user": who.user, "can_sign_in": who.can_sign_in, "auth_on": who.auth_on,
            "csrf": state.sessions.csrf_token(request[SESSION]), "path": here(request, path_qs=True)}
    return aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status, app_key=TEMPLATES)


def error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return render("error.html", request, {"title": title, "message": message, "status": status}, status)


def not_found(request: web.Request, what: str) -> web.Response:
    who = viewer(request)
    hint = " Sign in to see more." if who.user is None and who.can_sign_in else ""
    return error_page(request, 404, "Not found", f"{what} does not exist, or you may not see it.{hint}")


# -- repositories ------------------------------------------------------------------------
async def repositories(request: web.Request) -> web.Response:
    who = viewer(request)
    query = request.query.get("q", "").strip()[:200]
    driver = request.config_dict[STORAGE]
    names = [name for name in await driver.list_repositories() if query in name and who.may_pull(name)]
    pages = _pages(request, len(names), REPOSITORIES_PER_PAGE, q=query)
    usage = await request.config_dict[UI].usage.current(wait=True)
    rows = []
    for name in names[pages["start"]:pages["end"]]:
        row = usage.get(name)
        rows.append({"name": name, "tags": len(await driver.list_tags(name)),
                     "bytes": row.referenced_bytes if row else None, "own": row.exclusive_bytes if row else None})
    return render("repositories.html", request, {"rows": rows, "query": query, "total": len(names), "pages": pages})


# -- one repository: its tags -----------------------------------------------------------------
async def repository(request: web.Request) -> web.Response:
    name = request.match_info["repo"]
    who = viewer(request)
    if not is_valid_name(name) or not who.may_pull(name):
        return not_found(request, f"Repository {name}")
    driver = request.config_dict[STORAGE]
    tags = await driver.list_tags(name)
    if not tags and not await driver.repository_exists(name):
        return not_found(request, f"Repository {name}")
    state = request.config_dict[UI]
    pages = _pages(request, len(tags), TAGS_PER_PAGE)
    shown = tags[pages["start"]:pages["end"]]
    stamps = await driver.stamp_tags(name, shown)
    summaries = await state.summaries.many([stamp.digest for stamp in stamps.values()])
    can_delete = may_delete(request, who, name) is None
    here_ = f"{ui_root(request)}/r/{name}"
    tag_row = None
    rows = []
    for tag in shown:
        stamp = stamps.get(tag)
        if stamp is None:  # deleted since the listing
            continue
        pushed, summary = _when(stamp.mtime), summaries.get(stamp.digest)
        key = (here_, tag, stamp.digest, pushed, can_delete)
        row = state.rows.get(key)
        if row is None:
            if tag_row is None:
                tag_row = request.config_dict[TEMPLATES].get_template("tag_row.html").module.tag_row
            row = tag_row(here_, tag, stamp.digest, pushed, summary, can_delete)
            if summary is not None:  # else it may be readable next time
                state.rows.put(key, row)
        rows.append(row)
    usage = (await state.usage.current()).get(name)
    deleted = request.query.get("deleted", "")
    return render("repository.html", request, {
        "name": name, "rows": rows, "total": len(tags), "pages": pages, "usage": usage,
        "can_delete": can_delete, "deleted": deleted if is_valid_tag(deleted) else None,
        "host": registry_host(request)})


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


# -- one image ---------------------------------------------------------------------------
async def image(request: web.Request) -> web.Response:
    name, reference = request.match_info["repo"], request.match_info["reference"]
    who = viewer(request)
    if not is_valid_name(name) or not who.may_pull(name):
        return not_found(request, f"Repository {name}")
    try:
        ref: Digest | str = Digest.parse(reference) if ":" in reference else reference
    except InvalidDigest:
        return not_found(request, f"{name}@{reference}")
    if isinstance(ref, str) and not is_valid_tag(ref):
        return not_found(request, f"{name}:{reference}")
    driver = request.config_dict[STORAGE]
    state = request.config_dict[UI]
    try:
        stored = await manifests.get_manifest(driver, name, ref, manifests.READ_LIMIT)
    except ManifestNotFound:
        return not_found(request, f"{name}{'@' if isinstance(ref, Digest) else ':'}{reference}")
    summary = await state.summaries.get(stored.digest, stored.media_type)
    try:
        manifest = parse_manifest(stored.data, stored.media_type)
    except (ManifestInvalid, ManifestUnsupported):
        manifest = None
    children = []
    if manifest is not None and manifest.is_index:
        found = await state.summaries.many([child.digest for child in manifest.children])
        children = [{"descriptor": child, "summary": found.get(child.digest)} for child in manifest.children]
    referrers = await _referrers(driver, name, stored.digest)
    stamp = (await driver.stamp_tags(name, [ref])).get(ref) if isinstance(ref, str) else None
    host = registry_host(request)
    pull_ref = f"{host}/{name}:{ref}" if isinstance(ref, str) else f"{host}/{name}@{stored.digest}"
    refusal = may_delete(request, who, name)
    return render("image.html", request, {
        "name": name, "reference": reference, "tag": ref if isinstance(ref, str) else None,
        "digest": str(stored.digest), "media_type": stored.media_type, "summary": summary, "manifest": manifest,
        "config": summary.config if summary is not None else None, "children": children,
        "referrers": referrers, "pushed": _when(stamp.mtime) if stamp else None,
        "pull": [f"docker pull {pull_ref}", f"kura pull {pull_ref}"],
        "can_delete": refusal is None and isinstance(ref, str),
        "raw": _pretty(stored.data)})


async def _referrers(driver, name: str, digest: Digest) -> list[tuple[str, list[dict]]]:
    """Referrer descriptors grouped by artifactType (signatures, SBOMs, attestations)."""
    groups: dict[str, list[dict]] = {}
    for referrer in (await driver.list_referrers(name, digest))[:REFERRERS_SHOWN]:
        descriptor = await driver.read_referrer(name, digest, referrer)
        if not isinstance(descriptor, dict):
            continue
        artifact_type = descriptor.get("artifactType")
        annotations = descriptor.get("annotations") if isinstance(descriptor.get("annotations"), dict) else {}
        groups.setdefault(artifact_type if isinstance(artifact_type, str) else "(none)", []).append({
            "digest": str(referrer), "size": descriptor.get("size"),
            "annotations": sorted((str(k), str(v)) for k, v in annotations.items())})
    return sorted(groups.items())


def _pretty(data: bytes) -> str:
    if len(data) > RAW_MANIFEST_SHOWN:
        return f"({len(data)} bytes: too large to show here)"
    try:
        return json.dumps(json.loads(data), indent=2)
    except (ValueError, RecursionError):
        return data.decode(errors="replace")


# -- delete a tag ---------------------------------------------------------------------------
async def delete_tag(request: web.Request) -> web.Response:
    name = request.match_info["repo"]
    form = await request.post()
    state = request.config_dict[UI]
    if not state.sessions.csrf_ok(request[SESSION], form.get("csrf")):
        return error_page(request, 403, "Refused", "The form has expired or did not come from this site: "
                                                    "reload the page and try again.")
    who = viewer(request)
    tag = form.get("tag")
    if not is_valid_name(name) or not who.may_pull(name) or not isinstance(tag, str) or not is_valid_tag(tag):
        return not_found(request, f"Repository {name}")
    refusal = may_delete(request, who, name)
    if refusal is not None:
        log.warning("web UI: delete of %s:%s by %s refused: %s", name, tag, who.user or "anonymous", refusal)
        return error_page(request, 403, "Refused", refusal)
    driver = request.config_dict[STORAGE]
    if not await manifests.delete_tag(driver, name, tag):
        return not_found(request, f"Tag {name}:{tag}")
    await notify.emit(request, "delete", notify.deleted(name, tag=tag), user=who.user)
    log.info("web UI: tag %s:%s deleted by %s", name, tag, who.user or "anonymous")
    state.usage.forget()
    raise web.HTTPSeeOther(f"{ui_root(request)}/r/{name}?{urlencode({'deleted': tag})}")


# -- sign in and out --------------------------------------------------------------------------
async def sign_in_form(request: web.Request) -> web.Response:
    who = viewer(request)
    if not who.can_sign_in:
        return error_page(request, 404, "No sign-in", "This registry has no accounts to sign in with.")
    next_page = _next(request, request.query.get("next"))
    return render("login.html", request, {"error": None, "username": "", "next": next_page})


def _next(request: web.Request, value: object) -> str:
    """Where to go after signing in: only a page of the UI itself (never another site)."""
    if isinstance(value, str) and value.startswith(ui_root(request) + "/") and "\\" not in value \
            and "//" not in value and len(value) < 2000:
        return value
    return ""


async def sign_in(request: web.Request) -> web.Response:
    who = viewer(request)
    state = request.config_dict[AUTH]
    if not who.can_sign_in:
        return error_page(request, 404, "No sign-in", "This registry has no accounts to sign in with.")
    form = await request.post()
    ui = request.config_dict[UI]
    user, password = form.get("username"), form.get("password")
    context = {"username": user if isinstance(user, str) else "", "next": _next(request, form.get("next"))}
    if not ui.sessions.csrf_ok(request[SESSION], form.get("csrf")):
        return render("login.html", request, {**context, "error": "The form has expired: try again."}, 403)
    if not isinstance(user, str) or not isinstance(password, str) or not valid_user_name(user):
        return render("login.html", request, {**context, "error": "Wrong user name or password."}, 401)
    credentials = state.credentials
    try:
        ok = await credentials.check(credentials.address_of(request), user, password)
    except RegistryError as exc:  # too many failed logins (429)
        response = render("login.html", request, {**context, "error": exc.text[:1].upper() + exc.text[1:] + "."},
                          exc.status)
        response.headers.update(exc.headers)
        return response
    if not ok:
        return render("login.html", request, {**context, "error": "Wrong user name or password."}, 401)
    request[NEW_SESSION] = Session.start(user, credentials.htpasswd.fingerprint(user))
    log.info("web UI: %s signed in from %s", user, credentials.address_of(request))
    raise web.HTTPSeeOther(context["next"] or f"{ui_root(request)}/")


async def sign_out(request: web.Request) -> web.Response:
    form = await request.post()
    if request.config_dict[UI].sessions.csrf_ok(request[SESSION], form.get("csrf")):
        request[NEW_SESSION] = Session.start()
    raise web.HTTPSeeOther(f"{ui_root(request)}/")
