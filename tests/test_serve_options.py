"""`kura serve` options that change how it runs: TLS, upload expiry, access log."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.paths import IMAGES, REPO, require_shared
from tests.support.servers import free_port, start_kura, stop


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_when_cert_and_key_are_set(tmp_path):
    require_shared()
    cert, key = self_signed(tmp_path)
    port = free_port()
    config = tmp_path / "kura.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                      f'[storage]\nroot = "{tmp_path / "data"}"\n')
    process = subprocess.Popen([sys.executable, "-m", "kura", "serve", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context, timeout=2) as r:
                    assert r.status == 200
                    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        # The server speaks only TLS on this port, so a successful push went over HTTPS.
        push = subprocess.run(["skopeo", "copy", "--dest-cert-dir", str(tmp_path / "certs.d"),
                               "--dest-tls-verify=false",
                               f"oci:{IMAGES / 'busybox-multiarch'}:latest-amd64",
                               f"docker://127.0.0.1:{port}/busybox:amd64"], capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        tags = json.loads(urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/busybox/tags/list",
                                                 context=context).read())
        assert tags == {"name": "busybox", "tags": ["amd64"]}
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_abandoned_uploads_expire(make_client):
    client = await make_client(upload_expiry_seconds=1, upload_purge_interval_seconds=1)
    location = (await client.post("/v2/a/blobs/uploads/")).headers["Location"]
    await client.patch(location, data=b"partial")
    assert (await client.get(location)).status == 204
    for _ in range(60):
        await asyncio.sleep(0.1)
        if (await client.get(location)).status == 404:
            break
    r = await client.get(location)
    assert r.status == 404


def test_access_log_switch(tmp_path):
    for enabled in (True, False):
        config = tmp_path / f"log-{enabled}.toml"
        config.write_text(f"[log]\naccess_log = {str(enabled).lower()}\n")
        log = tmp_path / f"log-{enabled}.txt"
        server = start_kura(tmp_path / "data", None, "--config", str(config), log=log)
        urllib.request.urlopen(f"{server.url}/v2/").read()
        stop(server)
        assert ('"GET /v2/ HTTP/1.1" 200' in log.read_text()) is enabled
