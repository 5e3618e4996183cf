"""The client in bounded memory against hostile images: decompression bombs (gzip and zstd),
layers with very many entries, oversized configs. Each runs the real `kura` command as a
child process against a registry serving the hostile image, and measures that process's
peak RSS (tests/support/peak_rss.py)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import pytest
import zstandard

from tests.support.cli import kura, one_line_error
from tests.support.faulty_registry import Faults, make_app

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MIB = 1 << 20
GIB = 1 << 30
RSS_LIMIT = 150 * MIB


def gzip_zeros(size: int) -> bytes:
    """A single gzip stream of `size` zero bytes, built without ever holding them: one deflated
    64 MiB run that ends in a full flush (so it refers to nothing before it) is repeated, then
    the final block and the trailer (CRC-32 and length of the whole) follow."""
    run = 64 * MIB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(bytes(run)) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.flush(zlib.Z_FINISH)
    crc, zeros = 0, bytes(MIB)
    for _ in range(size // MIB):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + piece * (size // run) + last + struct.pack("<II", crc, size & 0xFFFFFFFF)


def zstd_zeros(size: int) -> bytes:
    """A zstd frame of `size` zero bytes (no content size in its header), compressed as a stream."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(MIB)
    return b"".join(compressor.compress(zeros) for _ in range(size // MIB)) + compressor.flush()


BOMBS = {"gzip": (GZIP, gzip_zeros), "zstd": (ZSTD, zstd_zeros)}


@pytest.fixture
async def registry(aiohttp_server):
    async def serve(layer: bytes, **faults) -> str:
        server = await aiohttp_server(make_app(layer, Faults(**faults)))
        return f"127.0.0.1:{server.port}"
    return serve


@pytest.mark.parametrize("kind", BOMBS)
async def test_two_gib_of_zeros_unpacks_in_bounded_memory(kind, registry, tmp_path):
    media_type, build = BOMBS[kind]
    layer = build(2 * GIB)
    assert len(layer) < 3 * MIB
    host = await registry(layer, layer_media_type=media_type)
    ran = await kura(tmp_path / "home", "pull", "--quiet", "--unpack", str(tmp_path / "bundle"),
                     f"{host}/bomb:{kind}", measure=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "bundle" / "config.json").exists()
    assert list((tmp_path / "bundle" / "rootfs").iterdir()) == []  # the zeros are an empty tar, then padding
    assert ran.peak_rss < RSS_LIMIT, f"peak RSS {ran.peak_rss / MIB:.0f} MiB"


@pytest.mark.parametrize("kind", BOMBS)
async def test_bomb_is_refused_at_the_limit_in_bounded_memory(kind, registry, tmp_path):
    """`--output docker-archive` inflates every layer too; --max-layer-bytes stops it there."""
    media_type, build = BOMBS[kind]
    host = await registry(build(2 * GIB), layer_media_type=media_type)
    archive = tmp_path / "bomb.tar"
    ran = await kura(tmp_path / "home", "pull", "--quiet", "--max-layer-bytes", str(256 * MIB),
                     "--output", f"docker-archive:{archive}", f"{host}/bomb:{kind}", measure=True, timeout=300)
    assert "limit" in one_line_error(ran)
    assert not archive.exists()
    assert ran.peak_rss < RSS_LIMIT, f"peak RSS {ran.peak_rss / MIB:.0f} MiB"


def many_whiteouts(count: int) -> bytes:
    """A gzip layer of `count` tiny entries (whiteouts of a file that is not there: cheap to apply)."""
    header = tarfile.TarInfo(".wh.nothing").tobuf(tarfile.USTAR_FORMAT)
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    batch = header * 1000
    out = [deflate.compress(batch) for _ in range(count // 1000)]
    return b"".join(out) + deflate.compress(bytes(1024)) + deflate.flush()


async def test_layer_entries_are_not_kept_in_memory(registry, tmp_path):
    """tarfile remembers every member it has read; a layer of 200k entries must cost no more
    memory than one of 20k (about 700 bytes an entry if they were kept: ~125 MiB here)."""
    peaks = {}
    for count in (20_000, 200_000):
        host = await registry(many_whiteouts(count), layer_media_type=GZIP)
        home = tmp_path / f"home-{count}"
        ran = await kura(home, "pull", "--quiet", "--unpack", str(home / "bundle"), f"{host}/many:1",
                         measure=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        peaks[count] = ran.peak_rss
    growth = peaks[200_000] - peaks[20_000]
    assert growth < 30 * MIB, f"peak RSS {peaks[20_000] / MIB:.0f} MiB -> {peaks[200_000] / MIB:.0f} MiB"


def big_config(size: int) -> bytes:
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    config["history"] = [{"comment": "x" * 1000} for _ in range(size // 1000)]
    return json.dumps(config).encode()


async def test_oversized_config_is_refused_before_download(registry, tmp_path):
    host = await registry(b"", config=big_config(5 * MIB))
    ran = await kura(tmp_path / "home", "pull", "--quiet", f"{host}/fat:1")
    message = one_line_error(ran)
    assert "config" in message and str(4 * MIB) in message
    store = tmp_path / "home" / "data" / "kura" / "store" / "blobs" / "sha256"
    assert not store.exists() or all(p.stat().st_size < MIB for p in store.iterdir())


async def test_oversized_config_in_the_store_is_not_read(tmp_path):
    """Unpack and inspect read the config from the store: a huge one (put there by an older
    Kura, or by hand) is refused by its size, not loaded."""
    from ocispec.digest import Digest
    from puller.store import Store

    home = tmp_path / "home"
    store = Store(home / "data" / "kura" / "store")
    config = big_config(5 * MIB)
    layer = io.BytesIO()
    tarfile.open(fileobj=layer, mode="w").close()
    layer_digest = Digest.of_bytes(layer.getvalue())
    store.put_bytes(layer.getvalue(), layer_digest)
    store.put_bytes(config, Digest.of_bytes(config))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": str(Digest.of_bytes(config)), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": str(layer_digest), "size": len(layer.getvalue())}]}).encode()
    store.put_bytes(manifest, Digest.of_bytes(manifest))
    store.add("localhost/fat:1", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                  "digest": str(Digest.of_bytes(manifest)), "size": len(manifest)})
    for command in (["unpack", "localhost/fat:1", str(tmp_path / "bundle")], ["inspect", "--local", "localhost/fat:1"]):
        message = one_line_error(await kura(home, *command))
        assert "config" in message and str(4 * MIB) in message, message


def gzip_tar(*blocks: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    return b"".join(deflate.compress(block) for block in blocks) + deflate.compress(bytes(1024)) + deflate.flush()


def directory(name: str, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    if pax is None:
        return info.tobuf(tarfile.USTAR_FORMAT)
    info.pax_headers = pax
    return info.tobuf(tarfile.PAX_FORMAT)


def global_header_of_many_keys() -> bytes:
    """A global PAX header just under the 1 MiB bound, of ~80k short records."""
    records = []
    size = i = 0
    while size < MIB - 64:
        record = b"13 k%06d=v\n" % i  # 13 bytes, its own length included
        records.append(record)
        size += len(record)
        i += 1
    payload = b"".join(records)
    header = tarfile.TarInfo("pax_global_header")
    header.type, header.size = tarfile.XGLTYPE, len(payload)
    return header.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


async def test_global_pax_header_is_not_copied_into_every_entry(registry, tmp_path):
    """tarfile merges a global header into each later entry's pax_headers; 400 directories
    after one of 80k records came to ~740 MiB from a ~190 KiB download."""
    layer = gzip_tar(global_header_of_many_keys(), *(directory(f"d{i}") for i in range(400)))
    assert len(layer) < 300 * 1024
    host = await registry(layer, layer_media_type=GZIP)
    bundle = tmp_path / "bundle"
    ran = await kura(tmp_path / "home", "pull", "--quiet", "--unpack", str(bundle), f"{host}/global:1",
                     measure=True)
    assert ran.returncode == 0, ran.stderr
    assert sorted(p.name for p in (bundle / "rootfs").iterdir()) == sorted(f"d{i}" for i in range(400))
    assert ran.peak_rss < RSS_LIMIT, f"peak RSS {ran.peak_rss / MIB:.0f} MiB"


async def test_directories_metadata_does_not_keep_their_pax_headers(registry, tmp_path):
    """Directory metadata is applied once the layer is done: 300 directories each with a 1 MiB
    PAX comment were held whole until then (~290 MiB)."""
    comment = {"comment": "x" * 1_000_000}
    layer = gzip_tar(*(directory(f"d{i}", comment) for i in range(300)))
    assert len(layer) < 2 * MIB
    host = await registry(layer, layer_media_type=GZIP)
    bundle = tmp_path / "bundle"
    ran = await kura(tmp_path / "home", "pull", "--quiet", "--unpack", str(bundle), f"{host}/dirs:1",
                     measure=True)
    assert ran.returncode == 0, ran.stderr
    assert len(list((bundle / "rootfs").iterdir())) == 300
    assert ran.peak_rss < RSS_LIMIT, f"peak RSS {ran.peak_rss / MIB:.0f} MiB"
