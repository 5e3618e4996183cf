"""Driver contract: usage ledgers (charge, refund, confirm, recount) kept exact across the
processes serving a store, and `recount` through the interface (run once per flavour, see
flavours.py). `measure` (kura du) is in test_gc_fsck_du.py."""

import asyncio

import pytest

from registry.config import make_quota
from storage import QuotaExceeded, usage

from .helpers import digest_of, push_image, put

KEY = "ab" * 32


async def test_a_ledger_counts_a_blob_once_and_refuses_past_the_limit(driver, other):
    ledger, elsewhere = driver.usage_ledger(KEY), other.usage_ledger(KEY)
    assert await ledger.total() is None
    a, b = digest_of(b"a"), digest_of(b"b")
    assert await ledger.charge(a, 60, 100) is not None
    assert await elsewhere.charge(a, 60, 100) is None  # already counted: free
    with pytest.raises(QuotaExceeded) as refused:
        await elsewhere.charge(b, 50, 100)
    assert (refused.value.used, refused.value.limit, refused.value.size) == (60, 100, 50)
    assert await ledger.total() == 60 and await elsewhere.total() == 60
    assert await elsewhere.charge(b, 40, 100) is not None  # exactly the limit is allowed
    assert await ledger.total() == 100


async def test_ledgers_are_separate(driver, other):
    a = digest_of(b"a")
    await driver.usage_ledger(KEY).charge(a, 10, 100)
    assert await other.usage_ledger("cd" * 32).total() is None
    assert await other.usage_ledger("cd" * 32).charge(a, 10, 100) is not None
    assert await driver.usage_ledger("cd" * 32).total() == 10 and await driver.usage_ledger(KEY).total() == 10


async def test_refund_undoes_a_charge_unless_confirmed_since(driver, other):
    ledger, elsewhere = driver.usage_ledger(KEY), other.usage_ledger(KEY)
    a, b = digest_of(b"a"), digest_of(b"b")
    token = await ledger.charge(a, 60, 100)
    await elsewhere.refund(a, token)
    assert await ledger.total() == 0
    assert await ledger.charge(a, 60, 100) is not None  # counted again from scratch
    await ledger.refund(a, token)  # a stale token: the newer charge stays
    assert await ledger.total() == 60
    token = await ledger.charge(b, 40, 100)
    await elsewhere.confirm(b, 40)  # another push linked it meanwhile
    await ledger.refund(b, token)
    assert await ledger.total() == 100


async def test_confirm_counts_once(driver, other):
    ledger, elsewhere = driver.usage_ledger(KEY), other.usage_ledger(KEY)
    a = digest_of(b"a")
    await ledger.confirm(a, 10)  # never charged (a recount dropped it): counted now
    await elsewhere.confirm(a, 10)
    assert await ledger.total() == 10
    assert await ledger.charge(a, 10, 10) is None


async def test_recount_keeps_what_was_charged_while_it_walked(driver, other):
    ledger, elsewhere = driver.usage_ledger(KEY), other.usage_ledger(KEY)
    gone, early, late = digest_of(b"gone"), digest_of(b"early"), digest_of(b"late")
    await ledger.charge(gone, 10, 1000)
    await ledger.confirm(gone, 10)
    await ledger.charge(early, 20, 1000)
    checkpoint = await ledger.checkpoint()
    await elsewhere.charge(late, 40, 1000)  # during the walk, which did not see it
    held = digest_of(b"held")
    assert await ledger.replace({held: 5}, checkpoint) == 45  # `gone` and `early` were not found
    assert await elsewhere.total() == 45
    assert await ledger.charge(late, 40, 1000) is None
    assert await ledger.charge(gone, 10, 1000) is not None  # no longer counted
    # A blob linked while the recount ran, dropped by it, is counted again when confirmed.
    checkpoint = await ledger.checkpoint()
    await ledger.replace({}, checkpoint)
    assert await ledger.total() == 0
    await elsewhere.confirm(held, 5)
    assert await ledger.total() == 5


async def test_concurrent_charges_from_two_processes_never_pass_the_limit(driver, other):
    ledgers = [driver.usage_ledger(KEY), other.usage_ledger(KEY)]

    async def charge(number: int) -> bool:
        try:
            await ledgers[number % 2].charge(digest_of(str(number).encode()), 10, 95)
            return True
        except QuotaExceeded:
            return False

    accepted = await asyncio.gather(*(charge(n) for n in range(30)))
    assert sum(accepted) == 9
    assert await ledgers[1].total() == 90


async def test_recount_counts_each_blob_once_per_namespace(driver, other):
    shared, config_a, config_b = b"s" * 1000, b'{"a":1}', b'{"b":22}'
    _, manifest_a = await push_image(driver, "team/a", "v1", config_a, shared)
    _, manifest_b = await push_image(driver, "team/b", "v1", config_b, shared)
    _, manifest_o = await push_image(driver, "other", "v1", config_a, b"o" * 300)
    await put(driver, "team/b", b"x" * 7)  # a blob with no manifest yet counts too
    team, elsewhere, both = (make_quota(["team/*"], 10**6), make_quota(["other"], 10**6),
                             make_quota(["team/a", "other"], 10**6))
    totals = await usage.recount(other, [team, elsewhere, both])
    assert totals[team.ledger] == 1000 + len(config_a) + len(config_b) + len(manifest_a) + len(manifest_b) + 7
    assert totals[elsewhere.ledger] == len(config_a) + 300 + len(manifest_o)
    assert totals[both.ledger] == 1000 + len(config_a) + len(manifest_a) + 300 + len(manifest_o)
    assert await usage.used_bytes(driver, team) == totals[team.ledger]


async def test_a_manifest_that_no_longer_parses_keeps_what_it_mentions(driver):
    import json

    from tests.conftest import OCI_MANIFEST
    layer = await put(driver, "r", b"L" * 10)
    document = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "Config": {},
                           "layers": [{"digest": str(layer)}]}).encode()
    digest = digest_of(document)
    await driver.put_small_blob(document, digest)
    assert layer in await usage.referenced_by_manifests(driver, {digest: OCI_MANIFEST})
    assert layer not in await usage.referenced_by_manifests(driver, {})
