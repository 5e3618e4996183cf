"""`kura du` and `kura repo delete`: look at and tidy a store, with or without a server on it."""

from __future__ import annotations

import asyncio
import json
import sys

from ocispec.names import is_valid_name
from storage import FilesystemDriver, RepositoryBusy, StorageDriver, StorageError, usage

from .config import Config


class CommandError(Exception):
    """One line for the user, exit status 1."""


def disk_usage(config: Config, as_json: bool) -> int:
    return _run(_disk_usage(config, as_json))


def delete_repository(config: Config, name: str, assume_yes: bool) -> int:
    return _run(_delete_repository(config, name, assume_yes))


def _run(work) -> int:
    try:
        return asyncio.run(_closing(work))
    except CommandError as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1
    except (OSError, StorageError) as exc:
        print(f"kura: {exc}", file=sys.stderr)
        return 1


_opened: list[StorageDriver] = []


async def _closing(work):
    try:
        return await work
    finally:
        while _opened:
            await _opened.pop().close()


def open_command_store(config: Config) -> StorageDriver:
    """The store a command works on, with or without a server on it: the filesystem one must
    exist already (a typo must not create a store), an S3 one is the configured bucket."""
    if config.storage_driver == "s3":
        from .startup import s3_driver

        driver = s3_driver(config)
    else:
        if not (config.root / "blobs").is_dir():
            raise CommandError(f"{config.root} is not a Kura store (no blobs/ directory)")
        driver = FilesystemDriver(config.root)
    _opened.append(driver)
    return driver


def where(config: Config) -> str:
    from .startup import describe_store
    return describe_store(config)


# -- kura du ----------------------------------------------------------------------------
async def _disk_usage(config: Config, as_json: bool) -> int:
    driver = open_command_store(config)
    report = await usage.measure(driver)
    reclaimable_blobs, reclaimable_bytes = await reclaimable_by_collection(driver, config, report)
    totals = await usage.recount(driver, config.quotas)
    quotas = [{"repositories": list(quota.repositories), "max_bytes": quota.max_bytes,
               "used_bytes": totals[quota.ledger]} for quota in config.quotas]
    if as_json:
        print(json.dumps({
            "repositories": [{"name": row.name, "manifests": row.manifests, "tags": row.tags,
                              "referenced_bytes": row.referenced_bytes, "exclusive_bytes": row.exclusive_bytes}
                             for row in report.repositories],
            "store": {"blobs": report.blobs, "bytes": report.store_bytes,
                      "reclaimable_blobs": reclaimable_blobs, "reclaimable_bytes": reclaimable_bytes},
            "quotas": quotas,
        }, indent=2))
        return 0
    rows = [("REPOSITORY", "MANIFESTS", "TAGS", "REFERENCED", "ONLY HERE")]
    rows += [(row.name, str(row.manifests), str(row.tags), human(row.referenced_bytes), human(row.exclusive_bytes))
             for row in report.repositories]
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>9}  {row[2]:>5}  {row[3]:>10}  {row[4]:>10}")
    print(f"store: {report.blobs} blob(s), {human(report.store_bytes)}; reclaimable by the next collection: "
          f"{reclaimable_blobs} blob(s), {human(reclaimable_bytes)}")
    for quota in quotas:
        share = quota["used_bytes"] * 100 // quota["max_bytes"]
        print(f"quota {', '.join(quota['repositories'])}: {quota['used_bytes']} of {quota['max_bytes']} bytes "
              f"used ({human(quota['used_bytes'])} of {human(quota['max_bytes'])}, {share}%)")
    return 0


async def reclaimable_by_collection(driver: StorageDriver, config: Config, report: usage.StoreUsage) -> tuple[int, int]:
    """What the next garbage collection would free, as (blobs, bytes): its own dry run, so the
    grace period and the untagged and retention rules count exactly as it applies them."""
    from .quota import collect_garbage

    planned = await collect_garbage(driver, config, dry_run=True)
    return len(planned.blobs), planned.bytes_freed


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- kura repo delete -------------------------------------------------------------------
async def _delete_repository(config: Config, name: str, assume_yes: bool) -> int:
    if not is_valid_name(name):
        raise CommandError(f"invalid repository name {name!r}")
    driver = open_command_store(config)
    if not await driver.repository_exists(name):
        raise CommandError(f"no repository {name!r} in {where(config)}")
    tags, manifests, links = await _contents(driver, name)
    summary = f"{tags} tags, {manifests} manifests, {links} blob links"
    if not assume_yes:
        if not sys.stdin.isatty():
            raise CommandError(f"not deleting {name} without confirmation: pass --yes")
        answer = await asyncio.to_thread(input, f"Delete repository {name} ({summary})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kura: nothing deleted", file=sys.stderr)
            return 1
    try:
        async with driver.repository_lock(name):
            tags, manifests, links = await _contents(driver, name)
            if not await driver.delete_repository(name):
                raise CommandError(f"no repository {name!r} in {where(config)}")
    except RepositoryBusy:
        raise CommandError(f"repository {name} is busy (a push or delete holds it); retry") from None
    print(f"deleted {name}: {tags} tags, {manifests} manifests, {links} blob links, and its upload sessions")
    print("its blobs stay until the next garbage collection (which frees those no other repository holds)")
    quotas = [quota for quota in config.quotas if quota.matches(name)]
    totals = await usage.recount(driver, quotas)
    for quota in quotas:
        print(f"quota {quota.label}: {totals[quota.ledger]} of {quota.max_bytes} bytes used")
    return 0


async def _contents(driver: StorageDriver, name: str) -> tuple[int, int, int]:
    return (len(await driver.list_tags(name)), len(await driver.list_manifests(name)),
            len(await driver.list_blob_links(name)))
