"""S3 requests per registry operation for Kura on SeaweedFS, counted by a proxy in front of
the S3 port (tests/s3_roundtrips.py): pinned so that a change that adds a round trip shows up.
The same table for the reference registry is printed by `python -m tests.s3_roundtrips`."""

from __future__ import annotations

import pytest

from tests.s3_roundtrips import format_table, measure_roundtrips
from tests.support.kura_s3 import start_kura_s3
from tests.support.s3_counter import CountingProxy
from tests.support.servers import stop

pytestmark = pytest.mark.e2e

# What Kura needs now; the Go reference registry on the same server, without its in-memory
# blob descriptor cache (which never learns of another instance's deletes), needs
# 4, 9, 7, 8, 19 and 1 (with that cache: 3, 5, 0, 1, 19, 1).
KURA = {"manifest GET by tag": 2, "manifest PUT": 7, "blob HEAD": 0, "blob GET": 1,
        "1 MiB monolithic upload": 11, "tag list": 1}


async def test_s3_requests_per_operation(s3_bucket, tmp_path):
    # Measured twice, the fewer counted: a request the client library retried (the store
    # answered 5xx under load) is not a round trip the operation needs.
    with CountingProxy(s3_bucket.endpoint) as proxy:
        server = start_kura_s3(proxy.via(s3_bucket), tmp_path / "kura")
        try:
            runs = [await measure_roundtrips(server.url, proxy, repo=f"roundtrip/run{n}") for n in range(2)]
        finally:
            stop(server)
    for measured in runs:
        print(format_table({"kura": measured}, breakdown=True))
    fewest = {first.operation: min(first.requests, second.requests) for first, second in zip(*runs)}
    assert fewest == KURA
