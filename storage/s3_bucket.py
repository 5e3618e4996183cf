"""Create the S3 driver's bucket when it does not exist (obstore does objects, not buckets).

One signed request (AWS Signature Version 4) with aiohttp, which the project has anyway,
rather than a second S3 library for a call made once at start.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from urllib.parse import quote, urlsplit

import aiohttp

from .errors import StoreUnavailable
from .s3_objects import S3Location

ALREADY_OURS = "BucketAlreadyOwnedByYou"


async def ensure_bucket(location: S3Location) -> bool:
    """Create the bucket unless it exists; True when it was created. Raises StoreUnavailable
    with the store's own words when it refuses (bad credentials, a bucket owned by others)."""
    access_key = location.access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret_key = location.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = None if location.access_key else os.environ.get("AWS_SESSION_TOKEN")
    endpoint = (location.endpoint or f"https://s3.{location.region}.amazonaws.com").rstrip("/")
    url = f"{endpoint}/{location.bucket}"
    body = b""
    if location.region != "us-east-1":
        body = ("<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                f"<LocationConstraint>{location.region}</LocationConstraint></CreateBucketConfiguration>").encode()
    headers = {}
    if access_key and secret_key:
        headers = sign_v4("PUT", url, body, region=location.region, access_key=access_key,
                          secret_key=secret_key, session_token=token)
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.put(url, data=body, headers=headers) as response:
                text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise StoreUnavailable(f"object store at {endpoint} cannot be reached: {exc}") from None
    if response.status == 200:
        return True
    if ALREADY_OURS in text:
        return False  # created meanwhile (another instance starting)
    raise StoreUnavailable(f"object store refused to create bucket {location.bucket!r}: "
                           f"HTTP {response.status} {_error_code(text)}")


def object_url(location: S3Location, key: str) -> str:
    """Path-style URL of `key` under the location's prefix."""
    endpoint = (location.endpoint or f"https://s3.{location.region}.amazonaws.com").rstrip("/")
    prefix = location.prefix.strip("/")
    return f"{endpoint}/{location.bucket}/{quote(prefix + '/' if prefix else '')}{quote(key)}"


def sign_v4(method: str, url: str, body: bytes, *, region: str, access_key: str, secret_key: str,
            session_token: str | None = None, now: datetime.datetime | None = None,
            extra: dict[str, str] | None = None) -> dict[str, str]:
    """The headers that sign this request for the `s3` service (path-style, no query);
    `extra` headers (lower-case names) are sent and signed too."""
    parts = urlsplit(url)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp, **(extra or {})}
    if session_token:
        headers["x-amz-security-token"] = session_token
    names = sorted(headers)
    canonical = "\n".join([method, parts.path or "/", parts.query,
                           "".join(f"{name}:{headers[name].strip()}\n" for name in names),
                           ";".join(names), payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")
    del headers["host"]  # aiohttp sends the same one itself
    return headers


def _error_code(text: str) -> str:
    start, end = text.find("<Code>"), text.find("</Code>")
    return text[start + 6:end] if 0 <= start < end else text[:200]
