"""Kura configured for the S3 driver on a test bucket (tests.support.seaweedfs.S3Bucket)."""

from __future__ import annotations

from pathlib import Path

from tests.support.servers import Server, start_kura


def storage_toml(bucket, *, root: Path, prefix: str = "", redirect: bool = False) -> str:
    """The [storage] part of a config file: the S3 driver on `bucket`, local files under `root`."""
    return (f'[storage]\nroot = "{root}"\ndriver = "s3"\n[storage.s3]\n'
            f'endpoint = "{bucket.endpoint}"\nregion = "{bucket.region}"\nbucket = "{bucket.bucket}"\n'
            f'prefix = "{prefix}"\naccess_key = "{bucket.access_key}"\nsecret_key = "{bucket.secret_key}"\n'
            f'redirect = {"true" if redirect else "false"}\n')


def start_kura_s3(bucket, workdir: Path, *, redirect: bool = False, extra_toml: str = "",
                  workers: int | None = 1) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "kura.toml"
    config.write_text(storage_toml(bucket, root=workdir / "data", redirect=redirect)
                      + "[log]\naccess_log = false\n" + extra_toml)
    return start_kura(workdir / "data", None, "--config", str(config), workers=workers)
