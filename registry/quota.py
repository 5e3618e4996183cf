"""Namespace quotas at push time (`[[quota]]`): what the upload and manifest handlers call.

A blob is charged to every quota whose namespace the repository is in before it is linked
there (the PUT that ends an upload, a monolithic POST, a mount, a manifest PUT); a blob the
namespace already stores is free. Over a quota, the push is 403 DENIED and nothing of it
stays. The counts live in the store's usage ledgers (storage/usage.py), shared by every
process serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from ocispec.digest import CANONICAL_ALGORITHM, Digest
from storage import QuotaExceeded, TooLarge, UploadBusy, UploadNotFound, usage
from storage.usage import Quota

from .context import CONFIG, STORAGE, config, storage
from .errors import Denied

log = logging.getLogger("kura.registry")


class Charge:
    """One blob being added under quotas. `void()` when it was not linked after all."""

    def __init__(self) -> None:
        self.linked = True
        self.headroom: int | None = None
        self.tightest: Quota | None = None  # the quota `headroom` comes from

    def void(self) -> None:
        self.linked = False

    def cap(self, max_size: int | None) -> int | None:
        """The largest body to accept for a blob whose size is not known in advance."""
        if self.headroom is None:
            return max_size
        return self.headroom if max_size is None else min(max_size, self.headroom)


def _namespaces(request: web.Request, repository: str) -> dict[str, Quota]:
    """The quotas on `repository`, one per namespace (the tightest, if several share one)."""
    tightest: dict[str, Quota] = {}
    for quota in config(request).quotas:
        if quota.matches(repository):
            known = tightest.get(quota.ledger)
            if known is None or quota.max_bytes < known.max_bytes:
                tightest[quota.ledger] = quota
    return tightest


@contextlib.asynccontextmanager
async def charged(request: web.Request, repository: str, digest: Digest | None, size: int | None,
                  *, upload: str | None = None):
    """Charge `digest` (`size` bytes; None when the body's length is unknown: the stored
    size is charged afterwards, and `Charge.cap` bounds the body by the room left) for the
    block that links it into `repository` (no `digest`: nothing to charge). Refused: the
    upload session `upload` is ended, then 403 DENIED."""
    quotas = _namespaces(request, repository) if digest is not None else {}
    charge = Charge()
    if not quotas:
        yield charge
        return
    store = storage(request)
    tokens: list[tuple[str, int]] = []
    try:
        for key, quota in sorted(quotas.items()):
            ledger = store.usage_ledger(key)
            token = await ledger.charge(digest, size or 0, quota.max_bytes)
            if token is not None:
                tokens.append((key, token))
                if size is None:
                    room = quota.max_bytes - (await ledger.total() or 0)
                    if charge.headroom is None or room < charge.headroom:
                        charge.headroom, charge.tightest = room, quota
    except QuotaExceeded as exc:
        await _refund(store, digest, tokens)
        if upload is not None:
            with contextlib.suppress(UploadNotFound, UploadBusy):
                await store.cancel_upload(upload)
        raise _denied(quota, exc.used, exc.size) from None
    try:
        yield charge
    except TooLarge as exc:
        await _refund(store, digest, tokens)
        if charge.tightest is not None and exc.limit == charge.headroom:
            quota = charge.tightest
            raise _denied(quota, quota.max_bytes - charge.headroom, None) from None
        raise
    except BaseException:
        # A failure after the link was written (a tag write, a cancelled request) still
        # leaves the blob in the repository: then it counts.
        if await _is_held(store, repository, digest):
            await _confirm(store, quotas, digest, size)
        else:
            await _refund(store, digest, tokens)
        raise
    if charge.linked:
        await _confirm(store, quotas, digest, size)
    else:
        await _refund(store, digest, tokens)


@contextlib.asynccontextmanager
async def manifest_charged(request: web.Request, repository: str, data: bytes, reference: Digest | str):
    """`charged` for a manifest pushed as `data` to `reference` (its digest is computed only
    when a quota applies)."""
    digest = None
    if _namespaces(request, repository):
        algorithm = reference.algorithm if isinstance(reference, Digest) else CANONICAL_ALGORITHM
        digest = await asyncio.to_thread(Digest.of_bytes, data, algorithm)
    async with charged(request, repository, digest, len(data)) as charge:
        yield charge


async def _is_held(store, repository: str, digest: Digest) -> bool:
    return await store.is_blob_linked(repository, digest) or \
        await store.get_manifest_link(repository, digest) is not None


async def _confirm(store, quotas: dict[str, Quota], digest: Digest, size: int | None) -> None:
    blob = await store.stat_blob(digest)
    for key in sorted(quotas):
        await store.usage_ledger(key).confirm(digest, blob.size if blob is not None else size or 0)


async def _refund(store, digest: Digest, tokens: list[tuple[str, int]]) -> None:
    for key, token in tokens:
        await store.usage_ledger(key).refund(digest, token)


def _denied(quota: Quota, used: int, needed: int | None) -> Denied:
    more = f"this blob needs {needed} more" if needed is not None else "this blob does not fit"
    return Denied(f"quota exceeded: the quota on {quota.label} allows {quota.max_bytes} bytes and "
                  f"{used} are used; {more}",
                  detail={"quota": list(quota.repositories), "max_bytes": quota.max_bytes,
                          "used_bytes": used, "needed_bytes": needed})


# False in all workers of `kura serve --workers N` but the first: the ledgers are shared.
RECOUNT_AT_START = web.AppKey("recount_at_start", bool)


async def recount_at_start(app: web.Application) -> None:
    """Make every quota's count exact before serving (content may have changed meanwhile)."""
    quotas = app[CONFIG].quotas
    if quotas and app.get(RECOUNT_AT_START, True):
        totals = await usage.recount(app[STORAGE], quotas)
        for quota in quotas:
            log.info("quota on %s: %d of %d bytes used", quota.label, totals[quota.ledger], quota.max_bytes)


async def collect_garbage(driver, settings, *, dry_run: bool = False):
    """One garbage collection (storage/gc.py), then, when it removed anything, a recount of
    the quotas (`settings` is the server Config), so deleted content frees its quota as soon
    as the collection has run. What `kura gc`, the periodic collection and `kura du` call."""
    from storage.gc import collect

    evicted: dict[str, set[str]] = {}
    if settings.proxies and not dry_run:
        from .proxy import eviction  # the proxy's modules (puller/) only when one is configured
        from .proxy.routing import Router

        # Caches above their max_bytes lose their least recently pulled images first; this
        # collection deletes at once what that leaves unreferenced.
        for done in await eviction.evict(driver, Router(settings.proxies)):
            for repository, digests in done.content.items():
                evicted.setdefault(repository, set()).update(digests)
    report = await collect(driver, settings.gc_settings(), dry_run=dry_run, evicted=evicted)
    if not dry_run and not report.skipped and settings.quotas:
        await usage.recount(driver, settings.quotas)
    return report
