"""Streaming decompression of layer blobs, in bounded memory, with a cap against decompression
bombs: at most one chunk (1 MiB) is inflated ahead of what was read (a few with read_ahead), so
a layer that expands a thousandfold is refused at the limit without ever being held."""

from __future__ import annotations

import hashlib
import queue
import threading
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


def _gzip_errors() -> tuple[type[Exception], ...]:
    try:
        from isal import isal_zlib
        return zlib.error, isal_zlib.error
    except ImportError:
        return (zlib.error,)


class _Gunzip:
    """Inflates gzip (concatenated members too) a chunk of output at a time, and serves reads
    of any size from that chunk: inflating only what each small read asks for would hand zlib
    the rest of its input chunk again on every call (its unconsumed_tail, a copy each time)."""
    kind = "gzip"

    def __init__(self, raw):
        self.raw = raw
        self.inflater = _gzip_decompressor()
        self.errors = _gzip_errors()
        self.inflated = b""
        self.served = 0  # of self.inflated

    def read(self, n: int) -> bytes:
        if self.served == len(self.inflated):
            self.inflated, self.served = self._inflate(), 0
        out = self.inflated[self.served:self.served + n]
        self.served += len(out)
        return out

    def _inflate(self) -> bytes:
        """The next at most CHUNK bytes of output; b"" at the end."""
        while True:
            if self.inflater.eof:
                # What follows a member is in unused_data (zlib leaves it in unconsumed_tail
                # too, where inflating it again would return nothing, forever).
                rest = self.inflater.unused_data or self.raw.read(CHUNK)
                if not rest:
                    return b""
                self.inflater = _gzip_decompressor()  # the next member of a concatenated stream
                data = self.inflater.decompress(rest, CHUNK)
            elif self.inflater.unconsumed_tail:
                data = self.inflater.decompress(self.inflater.unconsumed_tail, CHUNK)
            else:
                chunk = self.raw.read(CHUNK)
                if not chunk:
                    raise LayerError("layer is not valid gzip data: the stream is truncated")
                data = self.inflater.decompress(chunk, CHUNK)
            if data:
                return data


class _Unzstd:
    """zstd frames (several in a row too) through a reader that inflates at most `n` bytes a call
    (zstandard's decompressobj has no output bound)."""

    kind = "zstd"

    def __init__(self, raw):
        import zstandard
        self.reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
        self.errors = (zstandard.ZstdError,)

    def read(self, n: int) -> bytes:
        return self.reader.read(n)


class _Plain:
    kind = "tar"
    errors = ()

    def __init__(self, raw):
        self.raw = raw

    def read(self, n: int) -> bytes:
        return self.raw.read(n)


class _ReadAhead:
    """A source read in a thread of its own, at most DEPTH chunks ahead of the caller, each
    chunk hashed there too: inflating and hashing (both let go of the GIL) go on while the
    caller parses the tar and writes files. What the source raises is raised to the caller,
    in order, at the read that would have met it."""

    DEPTH = 4

    def __init__(self, source, hasher):
        self.kind, self.errors = source.kind, source.errors
        self._source, self._hasher = source, hasher
        self._queue: queue.Queue = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._chunk, self._served = b"", 0
        self._end: BaseException | None = None  # once met: what the source raised, or EOFError
        self._thread = threading.Thread(target=self._run, name="layer-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(CHUNK)
                self._hasher.update(data)
                self._queue.put(data)
                if not data:
                    return
        except BaseException as exc:  # noqa: B036 - handed to the reading thread
            self._queue.put(exc)

    def read(self, n: int) -> bytes:
        if self._served == len(self._chunk):
            if self._end is None:
                item = self._queue.get()
                if isinstance(item, bytes) and item:
                    self._chunk, self._served = item, 0
                else:
                    self._end = item or EOFError()
            if self._end is not None:
                if isinstance(self._end, EOFError):
                    return b""
                raise self._end
        out = self._chunk[self._served:self._served + n]
        self._served += len(out)
        return out

    def close(self) -> None:
        """Stop the thread (before the raw file it reads is closed)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # a put waiting for room ends
            except queue.Empty:
                pass
        self._thread.join()


class DecompressedLayer:
    """A file-like reader of a layer's uncompressed tar stream. Counts and hashes what it
    yields (the diff_id) and refuses to go past `limit` bytes. With `read_ahead`, inflating and
    hashing run in a thread (see _ReadAhead): close it, or use it as a context manager."""

    def __init__(self, raw, media_type: str, limit: int = DEFAULT_MAX_LAYER_BYTES, *, read_ahead: bool = False):
        self.limit = limit
        self.size = 0
        self.hasher = hashlib.sha256()
        if media_type in GZIP_TYPES:
            source = _Gunzip(raw)
        elif media_type in ZSTD_TYPES:
            source = _Unzstd(raw)
        elif media_type in TAR_TYPES:
            source = _Plain(raw)
        else:
            raise LayerError(f"unsupported layer media type {media_type!r}")
        self._hashing = not read_ahead  # else the thread hashes each chunk as it reads it
        self._source = _ReadAhead(source, self.hasher) if read_ahead else source

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if isinstance(self._source, _ReadAhead):
            self._source.close()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        # Never more than one chunk (and never past the limit, plus one byte to notice it) is
        # returned, whatever a caller asks for; sources inflate at most one chunk ahead.
        wanted = min(n, CHUNK, self.limit - self.size + 1)
        try:
            out = self._source.read(wanted) if wanted > 0 else b""
        except self._source.errors as exc:
            raise LayerError(f"layer is not valid {self._source.kind} data: {exc}") from None
        self.size += len(out)
        if self.size > self.limit:
            raise LayerError(f"layer decompresses to more than {self.limit} bytes (limit); refusing it")
        if self._hashing:
            self.hasher.update(out)
        return out

    def drain(self) -> None:
        """Read to the end (tar padding after the last member counts for the diff_id)."""
        while self.read(CHUNK):
            pass
