"""The reference registry (Debian `docker-registry`, CNCF distribution 2.8) on S3: its `s3` storage
driver pointed at a bucket of the tests' SeaweedFS (or at a CountingProxy in front of it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .seaweedfs import S3Bucket
from .servers import Server, free_port, wait_until_up


def reference_env() -> dict[str, str]:
    """The environment without REGISTRY_* (distribution reads them as config overrides) and without
    AWS_* (AWS_CA_BUNDLE, set on these machines, makes the binary panic at start with
    LoadCustomCABundleError; AWS_ACCESS_KEY_ID and friends would compete with the config)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "AWS_"))}


def reference_config(bucket: S3Bucket, port: int, *, redirect: bool = False, blobdescriptor: str = "inmemory",
                     rootdirectory: str = "", loglevel: str = "error") -> str:
    cache = f"blobdescriptor: {blobdescriptor}" if blobdescriptor != "none" else "{}"
    root = f"\n    rootdirectory: {rootdirectory}" if rootdirectory else ""
    return f"""version: 0.1
log:
  level: {loglevel}
  accesslog:
    disabled: true
storage:
  s3:
    accesskey: {bucket.access_key}
    secretkey: {bucket.secret_key}
    region: {bucket.region}
    regionendpoint: {bucket.endpoint}
    bucket: {bucket.bucket}
    forcepathstyle: true
    secure: false
    v4auth: true{root}
  delete:
    enabled: true
  redirect:
    disable: {str(not redirect).lower()}
  cache:
    {cache}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def start_reference_s3(workdir: Path, bucket: S3Bucket, **options) -> Server:
    """Start `docker-registry serve` on a free port over `bucket` (created beforehand) and wait
    until GET /v2/ answers 200. Options: redirect (default False: blob bytes flow through the
    registry; True: blob GETs answer 307 to a presigned S3 URL, the driver's own default),
    blobdescriptor ("inmemory", as Debian's stock config, or "none"), rootdirectory, loglevel.
    Stop it with tests.support.servers.stop(server); its log is workdir/registry.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(reference_config(bucket, port, **options))
    with open(workdir / "registry.log", "ab") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=reference_env())
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v2/", process)
    except Exception as exc:
        process.kill()
        process.wait()
        log_text = (workdir / "registry.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"docker-registry on S3 did not start: {exc}\n{log_text}") from exc
    return Server("distribution-s3", f"127.0.0.1:{port}", workdir, process,
                  extra={"workdir": workdir, "bucket": bucket})
