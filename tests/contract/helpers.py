"""What the contract tests share: content, uploads, images, waiting."""

from __future__ import annotations

import asyncio
import hashlib

from ocispec.digest import Digest
from storage import BlobContent, StorageDriver
from storage.manifests import put_manifest
from tests.conftest import OCI_MANIFEST, image_manifest

DATA = b"abcdefghij" * 300_000  # 3 MB: more than one write batch
MEDIA_TYPE = OCI_MANIFEST


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


async def chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def read_all(driver: StorageDriver, digest: Digest, start: int = 0, length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in driver.read_blob(digest, start, length)])


async def upload(driver: StorageDriver, repo: str, data: bytes) -> BlobContent:
    """Through an upload session."""
    session = await driver.create_upload(repo)
    await driver.append_upload(session.uuid, chunks(data))
    return await driver.commit_upload(session.uuid, digest_of(data))


async def put(driver: StorageDriver, repo: str, data: bytes) -> Digest:
    """In one go (put_blob)."""
    digest = digest_of(data)
    await driver.put_blob(repo, digest, chunks(data))
    return digest


async def push_image(driver: StorageDriver, repo: str, tag: str | None, config: bytes, *layers: bytes,
                     **extra) -> tuple[Digest, bytes]:
    """Store the blobs, then the manifest as a push does; returns its digest and bytes."""
    for blob in (config, *layers):
        await put(driver, repo, blob)
    manifest = image_manifest(str(digest_of(config)), len(config),
                              [(str(digest_of(layer)), len(layer)) for layer in layers], **extra)
    digest, _ = await put_manifest(driver, repo, manifest, OCI_MANIFEST, tags=(tag,) if tag else ())
    return digest, manifest


async def entered_within(context, seconds: float) -> bool:
    """Whether `context` (an async context manager) is entered within `seconds`; if so it is
    left again."""
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def hold():
        async with context:
            entered.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    try:
        await asyncio.wait_for(entered.wait(), seconds)
        return True
    except TimeoutError:
        return False
    finally:
        leave.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
