"""Event notifications from a store on S3 (real SeaweedFS): two instances share the bucket's
outbox; one at a time delivers (an S3 lease), each event once and in order, also after the
endpoint was down."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from registry.app import make_app
from registry.notify.config import parse
from storage.s3 import S3Driver
from storage.s3_objects import S3Location
from tests.conftest import push_image, serve_app
from tests.support.event_receiver import EventReceiver

pytestmark = pytest.mark.e2e


async def test_two_instances_on_one_bucket_deliver_every_event_once_in_order(aiohttp_client, config, s3_bucket):
    location = S3Location(s3_bucket.endpoint, s3_bucket.region, s3_bucket.bucket, f"notify-{uuid.uuid4().hex[:10]}",
                          s3_bucket.access_key, s3_bucket.secret_key)
    receiver = EventReceiver()  # down while the first pushes arrive
    config = replace(config, notifications=parse([{"url": receiver.url, "backoff_seconds": 0.05,
                                                   "max_backoff_seconds": 0.2}]))
    instances = [await serve_app(aiohttp_client, config, make_app(config, S3Driver(location))) for _ in range(2)]
    for n in range(2):
        await push_image(instances[n % 2], "app", f"t{n}", layer=b"%d" % n)
    await receiver.start()
    try:
        for n in range(2, 4):
            await push_image(instances[n % 2], "app", f"t{n}", layer=b"%d" % n)
        await receiver.wait_for(12)
        events = await receiver.settle(1.5)  # the other instance polls the bucket every second
    finally:
        await receiver.stop()
    assert [e["target"]["tag"] for e in events if "tag" in e["target"]] == ["t0", "t1", "t2", "t3"]
    assert len({e["id"] for e in events}) == len(events) == 12
    assert len({e["source"]["instanceID"] for e in events}) == 2
    assert not await S3Driver(location).pending_outbox(config.notifications[0].name, 10)
