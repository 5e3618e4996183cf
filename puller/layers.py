"""Streaming decompression of layer blobs, with a cap against decompression bombs."""

from __future__ import annotations

import hashlib
import zlib

from ocispec import mediatypes as mt

CHUNK = 1 << 20
DEFAULT_MAX_LAYER_BYTES = 16 << 30

GZIP_TYPES = {mt.OCI_LAYER_GZIP, mt.DOCKER_LAYER_GZIP, mt.DOCKER_FOREIGN_LAYER,
              "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"}
ZSTD_TYPES = {mt.OCI_LAYER_ZSTD, "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"}
TAR_TYPES = {mt.OCI_LAYER_TAR, "application/vnd.oci.image.layer.nondistributable.v1.tar"}


class LayerError(ValueError):
    pass


def _gzip_decompressor():
    """Prefer ISA-L's igzip (several times faster than zlib at inflating) when installed."""
    try:
        from isal import isal_zlib
        return isal_zlib.decompressobj(wbits=47)
    except ImportError:
        return zlib.decompressobj(wbits=47)


class DecompressedLayer:
    """A file-like reader of a layer's uncompressed tar stream. Counts and hashes what it
    yields (the diff_id) and stops past `limit` bytes."""

    def __init__(self, raw, media_type: str, limit: int = DEFAULT_MAX_LAYER_BYTES):
        self.raw = raw
        self.limit = limit
        self.size = 0
        self.hasher = hashlib.sha256()
        self._buffer = bytearray()
        self._eof = False
        if media_type in GZIP_TYPES:
            self._kind = "gzip"
            self._inflater = _gzip_decompressor()
        elif media_type in ZSTD_TYPES:
            import zstandard
            self._kind = "zstd"
            self._inflater = zstandard.ZstdDecompressor().decompressobj()
        elif media_type in TAR_TYPES:
            self._kind = "tar"
        else:
            raise LayerError(f"unsupported layer media type {media_type!r}")

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def _fill(self, wanted: int) -> None:
        while len(self._buffer) < wanted and not self._eof:
            chunk = self.raw.read(CHUNK)
            if not chunk:
                self._eof = True
                if self._kind == "gzip":
                    self._buffer += self._inflater.flush()
                break
            if self._kind == "tar":
                self._buffer += chunk
            elif self._kind == "gzip":
                data = self._inflater.decompress(chunk)
                # Concatenated gzip members: start a new inflater on what is left over.
                while self._inflater.eof and self._inflater.unused_data:
                    rest = self._inflater.unused_data
                    self._inflater = _gzip_decompressor()
                    data += self._inflater.decompress(rest)
                self._buffer += data
            else:
                self._buffer += self._inflater.decompress(chunk)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        self._fill(n)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.size += len(out)
        if self.size > self.limit:
            raise LayerError(f"layer decompresses to more than {self.limit} bytes (limit); refusing it")
        self.hasher.update(out)
        return out

    def drain(self) -> None:
        """Read to the end (tar padding after the last member counts for the diff_id)."""
        while self.read(CHUNK):
            pass
