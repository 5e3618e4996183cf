"""Driver contract: outboxes, the durable queues event notifications are delivered from
(registry/notify/), run once per flavour (see flavours.py)."""

from __future__ import annotations

import pytest


async def test_records_come_back_oldest_first_from_any_process(driver, other):
    keys = [await driver.append_outbox("hook-a", f"event {n}".encode()) for n in range(5)]
    keys.append(await other.append_outbox("hook-a", b"event 5"))
    assert keys == sorted(keys)
    await driver.append_outbox("hook-b", b"another endpoint's")

    first = await other.pending_outbox("hook-a", 4)
    assert [r.data for r in first] == [b"event 0", b"event 1", b"event 2", b"event 3"]
    assert [r.key for r in first] == keys[:4]

    await other.remove_outbox("hook-a", [r.key for r in first[:3]])
    await other.remove_outbox("hook-a", [first[0].key])  # gone already: ignored
    rest = await driver.pending_outbox("hook-a", 100)
    assert [r.data for r in rest] == [b"event 3", b"event 4", b"event 5"]
    assert [r.data for r in await driver.pending_outbox("hook-b", 100)] == [b"another endpoint's"]
    assert await driver.pending_outbox("never-used", 10) == []


async def test_a_failed_record_leaves_the_queue_and_is_kept(driver, other):
    first = await driver.append_outbox("hook", b"undeliverable")
    await driver.append_outbox("hook", b"next")
    await other.fail_outbox("hook", first)
    assert [r.data for r in await driver.pending_outbox("hook", 10)] == [b"next"]
    assert [(r.key, r.data) for r in await driver.failed_outbox("hook")] == [(first, b"undeliverable")]
    await other.fail_outbox("hook", first)  # moved already: nothing happens
    assert len(await driver.failed_outbox("hook")) == 1


async def test_one_holder_of_an_outbox_lease_at_a_time(driver, other):
    async with driver.outbox_lease("hook") as held:
        assert held is not None and not held.lost
        async with other.outbox_lease("hook") as second:
            assert second is None
        async with other.outbox_lease("other-hook") as unrelated:
            assert unrelated is not None
    async with other.outbox_lease("hook") as after_release:
        assert after_release is not None


async def test_outbox_names_and_keys_cannot_escape(driver):
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            await driver.append_outbox(bad, b"x")
    with pytest.raises(ValueError):
        await driver.remove_outbox("hook", ["../../blobs"])
