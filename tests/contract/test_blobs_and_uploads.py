"""Driver contract: blobs and upload sessions (run once per flavour, see flavours.py)."""

import asyncio
import time

import pytest

from ocispec.digest import Digest
from storage import (
    BlobNotFound,
    DigestMismatch,
    RangeMismatch,
    RepositoryBusy,
    SizeMismatch,
    TooLarge,
    TooManyUploads,
    UploadInfo,
    UploadNotFound,
    UploadQuota,
)

from .helpers import DATA, chunks, digest_of, read_all, upload

UNKNOWN_UPLOAD = "00000000-0000-4000-8000-000000000000"


async def test_upload_commit_and_read(driver, other):
    blob = await upload(driver, "a", DATA)
    assert (blob.digest, blob.size) == (digest_of(DATA), len(DATA))
    assert await driver.is_blob_linked("a", blob.digest)
    assert not await driver.is_blob_linked("b", blob.digest)
    for d in (driver, other):
        assert (await d.stat_blob(blob.digest)).size == len(DATA)
        assert await read_all(d, blob.digest) == DATA
        assert await read_all(d, blob.digest, 5, 10) == DATA[5:15]
        assert await read_all(d, blob.digest, len(DATA) - 3) == DATA[-3:]
        assert await read_all(d, blob.digest, 2_000_000, 1_000_000) == DATA[2_000_000:3_000_000]


async def test_missing_blobs(driver):
    missing = digest_of(b"nothing")
    assert await driver.stat_blob(missing) is None
    with pytest.raises(BlobNotFound):
        await read_all(driver, missing)
    with pytest.raises(BlobNotFound):
        await driver.read_small_blob(missing, 100)


async def test_an_empty_blob(driver):
    blob = await upload(driver, "a", b"")
    assert blob.size == 0 and (await driver.stat_blob(digest_of(b""))).size == 0
    assert await read_all(driver, digest_of(b"")) == b""


async def test_put_blob_stores_verifies_and_links(driver, other):
    blob = await driver.put_blob("a", digest_of(DATA), chunks(DATA), length=len(DATA), max_size=len(DATA))
    assert (blob.digest, blob.size) == (digest_of(DATA), len(DATA))
    assert await other.is_blob_linked("a", blob.digest)
    assert await read_all(other, blob.digest) == DATA


async def test_a_failed_put_blob_stores_nothing(driver, other):
    data = DATA[:1_500_000]

    async def broken():
        yield data[:1_000_000]
        raise ConnectionResetError("client went away")

    failures = [
        (DigestMismatch, dict(digest=digest_of(b"other"), chunks=chunks(data))),
        (SizeMismatch, dict(digest=digest_of(data), chunks=chunks(data), length=len(data) - 1)),
        (SizeMismatch, dict(digest=digest_of(data), chunks=chunks(data), length=len(data) + 1)),
        (TooLarge, dict(digest=digest_of(data), chunks=chunks(data), max_size=1000)),
        (ConnectionResetError, dict(digest=digest_of(data), chunks=broken())),
    ]
    for error, arguments in failures:
        with pytest.raises(error):
            await driver.put_blob("a", **arguments)
        for d in (driver, other):
            assert await d.stat_blob(digest_of(data)) is None, error
            assert await d.stat_blob(digest_of(b"other")) is None, error
            assert not await d.is_blob_linked("a", digest_of(data)), error
    assert [blob.digest async for blob in other.iter_blobs()] == []


async def test_a_cancelled_put_blob_stores_nothing(driver, other):
    arrived = asyncio.Event()

    async def slow():
        yield DATA[:1_000_000]
        arrived.set()
        await asyncio.sleep(60)
        yield DATA[1_000_000:]

    task = asyncio.create_task(driver.put_blob("a", digest_of(DATA), slow()))
    await asyncio.wait_for(arrived.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await other.stat_blob(digest_of(DATA)) is None
    assert not await other.is_blob_linked("a", digest_of(DATA))


async def test_chunked_offsets(driver):
    session = await driver.create_upload("a")
    info = await driver.append_upload(session.uuid, chunks(DATA[:1000]), offset=0, length=1000)
    assert (info.uuid, info.repository, info.size) == (session.uuid, "a", 1000)
    with pytest.raises(RangeMismatch) as exc:
        await driver.append_upload(session.uuid, chunks(DATA[:10]), offset=500)
    assert exc.value.current_size == 1000
    await driver.append_upload(session.uuid, chunks(DATA[1000:]), offset=1000)
    assert (await driver.get_upload(session.uuid)).size == len(DATA)
    await driver.commit_upload(session.uuid, digest_of(DATA), size=len(DATA))


async def test_a_failed_append_leaves_the_session_as_it_was(driver, other):
    """Size and bytes: after every kind of failure the session goes on, in either process,
    and its content is exactly what was appended successfully."""
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:100]))

    async def broken():
        yield DATA[100:1_200_000]
        raise ConnectionResetError("client went away")

    failures = [
        (RangeMismatch, dict(chunks=chunks(DATA[100:200]), offset=0)),
        (RangeMismatch, dict(chunks=chunks(DATA[100:200]), offset=101)),
        (SizeMismatch, dict(chunks=chunks(DATA[100:200]), length=50)),
        (SizeMismatch, dict(chunks=chunks(DATA[100:1_200_000]), length=1_200_000)),
        (TooLarge, dict(chunks=chunks(DATA[100:]), max_size=1_000_000)),
        (ConnectionResetError, dict(chunks=broken())),
    ]
    for number, (error, arguments) in enumerate(failures):
        appender = (driver, other)[number % 2]
        with pytest.raises(error):
            await appender.append_upload(session.uuid, **arguments)
        for d in (driver, other):
            assert (await d.get_upload(session.uuid)).size == 100, error

    arrived = asyncio.Event()

    async def stalled():
        yield DATA[100:1_200_000]
        arrived.set()
        await asyncio.sleep(60)
        yield b"never"

    task = asyncio.create_task(other.append_upload(session.uuid, stalled()))
    await asyncio.wait_for(arrived.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await driver.get_upload(session.uuid)).size == 100

    await other.append_upload(session.uuid, chunks(DATA[100:2_000_000]), offset=100)
    await driver.append_upload(session.uuid, chunks(DATA[2_000_000:]), offset=2_000_000)
    blob = await other.commit_upload(session.uuid, digest_of(DATA), size=len(DATA))
    assert blob.size == len(DATA) and await read_all(driver, blob.digest) == DATA


async def test_digest_mismatch_stores_nothing_and_ends_session(driver, other):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA))
    wrong = digest_of(b"other")
    with pytest.raises(DigestMismatch):
        await driver.commit_upload(session.uuid, wrong)
    for d in (driver, other):
        assert await d.stat_blob(digest_of(DATA)) is None
        assert await d.stat_blob(wrong) is None
        assert not await d.is_blob_linked("a", wrong)
        with pytest.raises(UploadNotFound):
            await d.get_upload(session.uuid)


async def test_size_mismatch_on_commit_stores_nothing_and_ends_session(driver, other):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:10]))
    with pytest.raises(SizeMismatch):
        await driver.commit_upload(session.uuid, digest_of(DATA[:10]), size=11)
    assert await other.stat_blob(digest_of(DATA[:10])) is None
    with pytest.raises(UploadNotFound):
        await other.get_upload(session.uuid)


async def test_continue_session_in_another_instance(driver, other):
    """A running hash is at most a per-process cache: another process's bytes count."""
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:2_000_000]))
    await other.append_upload(session.uuid, chunks(DATA[2_000_000:]), offset=2_000_000)
    with pytest.raises(DigestMismatch):
        await driver.commit_upload(session.uuid, digest_of(DATA[:2_000_000]))

    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA[:2_000_000]))
    await other.append_upload(session.uuid, chunks(DATA[2_000_000:]))
    await driver.commit_upload(session.uuid, digest_of(DATA))
    assert (await other.stat_blob(digest_of(DATA))).size == len(DATA)


async def test_the_same_content_committed_twice_and_into_two_repositories(driver, other):
    first = await upload(driver, "a", b"same")
    second = await upload(other, "b", b"same")
    assert first.digest == second.digest
    assert await driver.repositories_linking_blob(first.digest) == ["a", "b"]
    assert await read_all(driver, first.digest) == b"same"
    results = await asyncio.gather(upload(driver, "c", DATA), upload(other, "d", DATA))
    assert {blob.digest for blob in results} == {digest_of(DATA)}
    assert await read_all(other, digest_of(DATA)) == DATA


async def test_sha512_commit(driver):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(DATA))
    blob = await driver.commit_upload(session.uuid, digest_of(DATA, "sha512"))
    assert blob.digest.algorithm == "sha512"
    assert await read_all(driver, blob.digest) == DATA


async def test_sessions_are_shared_and_listed(driver, other):
    before = time.time()
    session = await driver.create_upload("team/app", owner="alice")
    info = await other.get_upload(session.uuid)
    assert (info.repository, info.owner, info.size) == ("team/app", "alice", 0)
    assert before - 1 <= info.started_at <= time.time() + 1
    assert await other.list_uploads() == [session.uuid]
    anonymous = await other.create_upload("b")
    assert (await driver.get_upload(anonymous.uuid)).owner is None
    assert await driver.list_uploads() == sorted([session.uuid, anonymous.uuid])
    await other.append_upload(session.uuid, chunks(b"x"))
    await driver.commit_upload(session.uuid, digest_of(b"x"))
    await other.cancel_upload(anonymous.uuid)
    assert await driver.list_uploads() == []


async def test_cancel_and_unknown(driver, other):
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(b"x"))
    await other.cancel_upload(session.uuid)
    for uuid in (session.uuid, "../../etc", UNKNOWN_UPLOAD, "", "a" * 500):
        with pytest.raises(UploadNotFound):
            await driver.get_upload(uuid)
        with pytest.raises(UploadNotFound):
            await driver.append_upload(uuid, chunks(b"x"))
        with pytest.raises(UploadNotFound):
            await driver.commit_upload(uuid, digest_of(b"x"))
        with pytest.raises(UploadNotFound):
            await driver.cancel_upload(uuid)
    assert await driver.stat_blob(digest_of(b"x")) is None


async def test_purge(driver, other):
    old = await driver.create_upload("a")
    assert await other.purge_uploads(time.time() - 3600) == 0
    assert await other.purge_uploads(time.time() + 1) == 1
    with pytest.raises(UploadNotFound):
        await driver.get_upload(old.uuid)


async def test_purge_judges_by_last_activity(driver, flavour):
    session = await driver.create_upload("a")
    await asyncio.sleep(flavour.clock_step)
    between = time.time()
    await asyncio.sleep(flavour.clock_step)
    await driver.append_upload(session.uuid, chunks(b"recent bytes"))
    # Started before `between`, but written after it: not abandoned.
    assert await driver.purge_uploads(between) == 0
    assert (await driver.get_upload(session.uuid)).size == len(b"recent bytes")
    assert await driver.purge_uploads(time.time() + 1) == 1


async def test_small_blobs(driver, other):
    data = b'{"schemaVersion": 2}'
    d = digest_of(data)
    await driver.put_small_blob(data, d)
    await other.put_small_blob(data, d)
    assert await other.read_small_blob(d, 100) == data
    assert await other.read_small_blob(d, len(data)) == data
    assert (await other.stat_blob(d)).size == len(data)
    with pytest.raises(TooLarge):
        await driver.read_small_blob(d, 5)
    with pytest.raises(BlobNotFound):
        await driver.read_small_blob(digest_of(b"none"), 100)


async def fill(create) -> int:
    """Sessions `create` opens one after the other until it is refused (at most 20)."""
    for opened in range(20):
        try:
            await create()
        except TooManyUploads:
            return opened
    return 20


async def test_open_sessions_are_capped_across_processes(driver, other):
    """A burst from two processes never goes over a cap (a driver may refuse some that would
    have fit, while they race); once it is over, the cap is reached exactly."""
    quota = UploadQuota(per_repository=5)
    results = await asyncio.gather(*[(driver if i % 2 else other).create_upload("a", "alice", quota=quota)
                                     for i in range(12)], return_exceptions=True)
    accepted = [r for r in results if isinstance(r, UploadInfo)]
    refused = [r for r in results if not isinstance(r, UploadInfo)]
    assert len(accepted) <= 5
    assert all(isinstance(r, TooManyUploads) and (r.scope, r.limit) == ("repository", 5) for r in refused)
    assert len(accepted) + await fill(lambda: other.create_upload("a", "alice", quota=quota)) == 5
    assert isinstance(await driver.create_upload("b", "alice", quota=quota), UploadInfo)

    quota = UploadQuota(per_owner=3)
    results = await asyncio.gather(*[(driver if i % 2 else other).create_upload(f"r{i}", "bob", quota=quota)
                                     for i in range(8)], return_exceptions=True)
    accepted = [r for r in results if isinstance(r, UploadInfo)]
    refused = [r for r in results if not isinstance(r, UploadInfo)]
    assert len(accepted) <= 3
    assert all(isinstance(r, TooManyUploads) and (r.scope, r.limit) == ("user", 3) for r in refused)
    assert len(accepted) + await fill(lambda: driver.create_upload("r9", "bob", quota=quota)) == 3
    # Sessions opened before a cap was configured count too.
    assert isinstance(await other.create_upload("new", "carol"), UploadInfo)
    with pytest.raises(TooManyUploads):
        await driver.create_upload("new", "dave", quota=UploadQuota(per_repository=1))


async def test_only_open_sessions_count(driver, other, flavour):
    """Finished and cancelled sessions do not count, nor those idle since before the cap's
    `active_since` (expired, not yet purged)."""
    def quota(since=0.0):
        return UploadQuota(per_owner=3, active_since=since)

    async def full(since=0.0):
        with pytest.raises(TooManyUploads) as refused:
            await driver.create_upload("x", "bob", quota=quota(since))
        assert (refused.value.scope, refused.value.limit) == ("user", 3)

    expiring = await driver.create_upload("a", "bob", quota=quota())
    await asyncio.sleep(flavour.clock_step)
    since = time.time()
    await asyncio.sleep(flavour.clock_step)
    committed, cancelled = [await other.create_upload(repo, "bob", quota=quota()) for repo in "bc"]
    await full()
    await other.append_upload(committed.uuid, chunks(b"done"))
    await driver.commit_upload(committed.uuid, digest_of(b"done"))
    await driver.create_upload("a", "bob", quota=quota())
    await full()
    await other.cancel_upload(cancelled.uuid)
    await driver.create_upload("a", "bob", quota=quota())
    await full()
    assert expiring.uuid in await driver.list_uploads()
    await other.create_upload("a", "bob", quota=quota(since))  # `expiring` no longer counts
    await full(since)
    assert isinstance(await driver.create_upload("a", "carol", quota=quota(since)), UploadInfo)


async def test_a_busy_commit_keeps_its_session(driver, other, flavour, monkeypatch):
    """A collection holding the store too long makes a commit RepositoryBusy; the client
    retries it, so the session must still be there."""
    flavour.shorten_lock_waits(monkeypatch, 0.2)
    session = await driver.create_upload("a")
    await driver.append_upload(session.uuid, chunks(b"data"))
    async with other.collection() as run, run.exclusive():
        with pytest.raises(RepositoryBusy):
            await driver.commit_upload(session.uuid, digest_of(b"data"))
    assert (await driver.get_upload(session.uuid)).size == 4
    await driver.commit_upload(session.uuid, digest_of(b"data"))
    assert await driver.is_blob_linked("a", digest_of(b"data"))


async def test_paths_refuse_unvalidated_input(driver):
    """Names, tags, digests and keys are validated by the driver itself, whoever calls it."""
    bad_digest = Digest("sha256", "../../../etc/passwd")
    await driver.put_small_blob(b"x", digest_of(b"x"))
    attempts = [
        lambda: driver.set_tag("../escape", "t", digest_of(b"x")),
        lambda: driver.set_tag("a", "../../t", digest_of(b"x")),
        lambda: driver.link_blob("a", bad_digest),
        lambda: driver.link_blob("A/B", digest_of(b"x")),
        lambda: driver.link_manifest("a", bad_digest, "application/json"),
        lambda: driver.resolve_tag("a/../b", "t"),
        lambda: driver.stat_blob(bad_digest),
        lambda: driver.create_upload("../a"),
        lambda: driver.write_cache_record("a", "../key", b"x"),
        lambda: driver.write_cache_record("a", "a/b", b"x"),
        lambda: driver.read_cache_record("..", "key"),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError):
            await attempt()
    assert await driver.list_repositories() == []
