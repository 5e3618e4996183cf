"""The running digest an upload carries from one instance to the next (storage/resumable_hash.py)."""

import hashlib
import json
import os
import random

import pytest

from storage.resumable_hash import ResumableHash, available


def test_libcrypto_is_there():
    assert available()  # on these machines the S3 driver must not fall back to re-reading uploads


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_resumed_state_continues_exactly_where_it_stopped(algorithm):
    data = os.urandom(3 * 1024 * 1024 + 17)
    cuts = sorted(random.Random(7).sample(range(1, len(data)), 40))
    hasher = ResumableHash(algorithm)
    start = 0
    for cut in cuts + [len(data)]:
        saved = json.loads(json.dumps(hasher.state()))  # as stored in the session object
        hasher = ResumableHash.resume(saved, start)
        hasher.update(memoryview(data)[start:cut])
        start = cut
    assert hasher.hexdigest() == hashlib.new(algorithm, data).hexdigest()


def test_hexdigest_does_not_end_the_hash():
    hasher = ResumableHash("sha256")
    hasher.update(b"abc")
    assert hasher.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    hasher.update(bytearray(b"def"))
    assert hasher.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


@pytest.mark.parametrize("saved", [
    None, {}, {"algorithm": "md5", "openssl": 0, "context": "00"},
    {"algorithm": "sha256", "openssl": -1, "context": "00" * 256},  # another libcrypto
    {"algorithm": "sha256", "context": "00" * 256},
    {"algorithm": "sha256", "openssl": None, "context": "zz"},
])
def test_a_state_this_process_cannot_use_is_refused(saved):
    if saved and "openssl" in saved and saved["openssl"] is None:
        saved = dict(saved, openssl=ResumableHash("sha256").state()["openssl"])
    assert ResumableHash.resume(saved, 0) is None


@pytest.mark.parametrize("algorithm, field_offset", [("sha256", 104), ("sha512", 208)])
def test_a_damaged_or_forged_context_is_refused_before_libcrypto_sees_it(algorithm, field_offset):
    hasher = ResumableHash(algorithm)
    hasher.update(b"x" * 1000)
    saved = hasher.state()
    assert ResumableHash.resume(saved, 1000) is not None
    assert ResumableHash.resume(saved, 999) is None  # not the session's size
    context = bytearray.fromhex(saved["context"])
    context[field_offset:field_offset + 4] = (0x7FFFFF00).to_bytes(4, "little")  # `num`: a memcpy length
    assert ResumableHash.resume(dict(saved, context=context.hex()), 1000) is None
    assert ResumableHash.resume(dict(saved, byteorder="big" if saved["byteorder"] == "little" else "little"), 1000) is None
