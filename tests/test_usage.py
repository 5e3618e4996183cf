"""Usage accounting in the store: the ledgers behind quotas, recounting, and `measure` (kura du)."""

import asyncio
import hashlib
import json

import pytest

from ocispec.digest import Digest
from registry.config import make_quota
from storage import FilesystemDriver, QuotaExceeded, usage
from storage.manifests import put_manifest
from tests.conftest import OCI_MANIFEST, image_manifest

KEY = "ab" * 32


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def chunks(data: bytes):
    yield data


async def put(driver, repo: str, data: bytes) -> Digest:
    digest = digest_of(data)
    await driver.put_blob(repo, digest, chunks(data))
    return digest


async def push_image(driver, repo: str, tag: str, config: bytes, *layers: bytes) -> tuple[Digest, int]:
    for blob in (config, *layers):
        await put(driver, repo, blob)
    manifest = image_manifest(str(digest_of(config)), len(config),
                              [(str(digest_of(layer)), len(layer)) for layer in layers])
    digest, _ = await put_manifest(driver, repo, manifest, OCI_MANIFEST, tags=(tag,))
    return digest, len(manifest)


@pytest.fixture
def driver(tmp_path):
    return FilesystemDriver(tmp_path / "store")


async def test_ledger_counts_a_blob_once_and_refuses_past_the_limit(driver, tmp_path):
    other_process = FilesystemDriver(tmp_path / "store").usage_ledger(KEY)
    ledger = driver.usage_ledger(KEY)
    assert await ledger.total() is None
    a, b = digest_of(b"a"), digest_of(b"b")
    assert await ledger.charge(a, 60, 100) is not None
    assert await other_process.charge(a, 60, 100) is None  # already counted: free
    with pytest.raises(QuotaExceeded) as refused:
        await other_process.charge(b, 50, 100)
    assert (refused.value.used, refused.value.limit, refused.value.size) == (60, 100, 50)
    assert await ledger.total() == 60


async def test_refund_undoes_a_charge_unless_confirmed_since(driver):
    ledger = driver.usage_ledger(KEY)
    a, b = digest_of(b"a"), digest_of(b"b")
    token = await ledger.charge(a, 60, 100)
    await ledger.refund(a, token)
    assert await ledger.total() == 0
    token = await ledger.charge(b, 40, 100)
    await ledger.confirm(b, 40)  # another push linked it meanwhile
    await ledger.refund(b, token)
    assert await ledger.total() == 40


async def test_recount_keeps_what_was_charged_while_it_walked(driver):
    ledger = driver.usage_ledger(KEY)
    gone, early, late = digest_of(b"gone"), digest_of(b"early"), digest_of(b"late")
    await ledger.charge(gone, 10, 1000)
    await ledger.confirm(gone, 10)
    await ledger.charge(early, 20, 1000)
    checkpoint = await ledger.checkpoint()
    await ledger.charge(late, 40, 1000)  # during the walk, which did not see it
    held = digest_of(b"held")
    assert await ledger.replace({held: 5}, checkpoint) == 45  # `gone` and `early` were not found
    assert await ledger.charge(late, 40, 1000) is None
    assert await ledger.charge(gone, 10, 1000) is not None  # no longer counted
    # A blob linked while the recount ran, dropped by it, is counted again when confirmed.
    checkpoint = await ledger.checkpoint()
    await ledger.replace({}, checkpoint)
    assert await ledger.total() == 0
    await ledger.confirm(held, 5)
    assert await ledger.total() == 5


async def test_concurrent_charges_from_two_processes_never_pass_the_limit(driver, tmp_path):
    ledgers = [driver.usage_ledger(KEY), FilesystemDriver(tmp_path / "store").usage_ledger(KEY)]

    async def charge(number: int) -> bool:
        try:
            await ledgers[number % 2].charge(digest_of(str(number).encode()), 10, 95)
            return True
        except QuotaExceeded:
            return False

    accepted = await asyncio.gather(*(charge(n) for n in range(30)))
    assert sum(accepted) == 9
    assert await ledgers[0].total() == 90


async def test_recount_counts_each_blob_once_per_namespace(driver):
    shared, config_a, config_b = b"s" * 1000, b'{"a":1}', b'{"b":22}'
    _, manifest_a = await push_image(driver, "team/a", "v1", config_a, shared)
    _, manifest_b = await push_image(driver, "team/b", "v1", config_b, shared)
    await push_image(driver, "other", "v1", config_a, b"o" * 300)
    await put(driver, "team/b", b"x" * 7)  # a blob with no manifest yet counts too
    team, other, both = (make_quota(["team/*"], 10**6), make_quota(["other"], 10**6),
                         make_quota(["team/a", "other"], 10**6))
    totals = await usage.recount(driver, [team, other, both])
    assert totals[team.ledger] == 1000 + len(config_a) + len(config_b) + manifest_a + manifest_b + 7
    other_manifest = totals[other.ledger] - len(config_a) - 300
    assert totals[both.ledger] == 1000 + len(config_a) + manifest_a + 300 + other_manifest
    assert await usage.used_bytes(driver, team) == totals[team.ledger]


async def test_measure_on_a_store_with_shared_layers(driver):
    base, app, cfg_a, cfg_b = b"B" * 5000, b"A" * 700, b'{"cfg":"a"}', b'{"cfg":"bb"}'
    digest_a, manifest_a = await push_image(driver, "lib/base", "1", cfg_a, base)
    await driver.set_tag("lib/base", "latest", digest_a)
    _, manifest_b = await push_image(driver, "lib/app", "1", cfg_b, base, app)
    orphan = await put(driver, "lib/app", b"O" * 33)  # linked, referenced by no manifest
    await put(driver, "lib/gone", b"G" * 11)
    async with driver.repository_lock("lib/gone"):
        await driver.delete_repository("lib/gone")  # its blob stays until a collection

    report = await usage.measure(driver)
    rows = {row.name: row for row in report.repositories}
    assert set(rows) == {"lib/base", "lib/app"}
    assert (rows["lib/base"].manifests, rows["lib/base"].tags) == (1, 2)
    assert rows["lib/base"].referenced_bytes == 5000 + len(cfg_a) + manifest_a
    assert rows["lib/base"].exclusive_bytes == len(cfg_a) + manifest_a
    assert rows["lib/app"].referenced_bytes == 5000 + 700 + len(cfg_b) + manifest_b + 33
    assert rows["lib/app"].exclusive_bytes == 700 + len(cfg_b) + manifest_b + 33
    assert report.blobs == 8
    assert report.store_bytes == 5000 + 700 + len(cfg_a) + len(cfg_b) + manifest_a + manifest_b + 33 + 11
    assert (report.reclaimable_blobs, report.reclaimable_bytes) == (2, 33 + 11)
    assert orphan not in await usage.referenced_by_manifests(driver, {})


async def test_a_manifest_that_no_longer_parses_keeps_what_it_mentions(driver):
    layer = await put(driver, "r", b"L" * 10)
    document = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "Config": {},
                           "layers": [{"digest": str(layer)}]}).encode()
    digest = digest_of(document)
    await driver.put_small_blob(document, digest)
    assert layer in await usage.referenced_by_manifests(driver, {digest: OCI_MANIFEST})
