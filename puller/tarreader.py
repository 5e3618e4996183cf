"""A layer's tar stream read entry by entry with tarfile, in bounded memory whatever it holds.

tarfile reads some headers whole and carries state from one entry to the next; left as it is,
a hostile layer makes either as large as it likes from a small download. Here:
- a PAX or GNU long-name/long-link header is at most 1 MiB (Go's archive/tar bound; containerd
  and Docker unpack with it), and those before one entry at most 8 and 2 MiB together (tarfile
  recurses from each to the next, holding them all);
- a global PAX header is an entry of its own, which the unpacker skips: Go's archive/tar hands
  it over so, and containerd, Docker and umoci ignore it. tarfile would merge it into every
  later entry's `pax_headers` instead (a copy of up to 1 MiB each);
- GNU sparse files (old-format `S` entries, PAX `GNU.sparse.*` records) are refused before their
  map is read, which tarfile does whole: image builders never write them.
"""

from __future__ import annotations

import tarfile

from .layers import CHUNK

MAX_SPECIAL_HEADER = 1 << 20
MAX_HEADERS_PER_ENTRY = 8
MAX_HEADER_BYTES_PER_ENTRY = 2 << 20

_EXTENDED_HEADERS = {tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


class UnsafeLayer(ValueError):
    """A layer entry that would reach outside the rootfs, or cannot be applied safely."""


def _sparse(name: str) -> UnsafeLayer:
    return UnsafeLayer(f"entry {name!r} is a GNU sparse file: image layers never hold these, and Kura refuses them")


class _LayerTarInfo(tarfile.TarInfo):
    def _proc_member(self, archive: _LayerTar):
        if self.type in _EXTENDED_HEADERS or self.type == tarfile.XGLTYPE:
            if self.size > MAX_SPECIAL_HEADER:
                raise UnsafeLayer(f"a tar extended header of {self.size} bytes (more than {MAX_SPECIAL_HEADER})")
        if self.type == tarfile.XGLTYPE:
            self.offset_data = archive.fileobj.tell()
            archive.offset = self.offset_data + self._block(self.size)  # its records are skipped unread
            return self
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse(self.name)
        if self.type in _EXTENDED_HEADERS:
            archive.count_extended_header(self.size)
        return super()._proc_member(archive)

    # tarfile calls these for PAX sparse records (1.0 reads its map from the entry's data)
    def _proc_gnusparse_00(self, next, pax_headers, buf):
        raise _sparse(pax_headers.get("path", next.name))

    def _proc_gnusparse_01(self, next, pax_headers):
        raise _sparse(pax_headers.get("GNU.sparse.name", next.name))

    def _proc_gnusparse_10(self, next, pax_headers, tarfile):
        raise _sparse(pax_headers.get("GNU.sparse.name", next.name))

    def _apply_pax_info(self, pax_headers, encoding, errors):
        if any(key.startswith("GNU.sparse.") for key in pax_headers):  # any other version, or a stray record
            raise _sparse(pax_headers.get("GNU.sparse.name", pax_headers.get("path", self.name)))
        super()._apply_pax_info(pax_headers, encoding, errors)


class _LayerTar(tarfile.TarFile):
    tarinfo = _LayerTarInfo

    def next(self):
        self._headers = self._header_bytes = 0  # of the entry about to be read
        return super().next()

    def count_extended_header(self, size: int) -> None:
        self._headers += 1
        self._header_bytes += size
        if self._headers > MAX_HEADERS_PER_ENTRY:
            raise UnsafeLayer(f"more than {MAX_HEADERS_PER_ENTRY} tar extended headers before one entry")
        if self._header_bytes > MAX_HEADER_BYTES_PER_ENTRY:
            raise UnsafeLayer(f"tar extended headers of more than {MAX_HEADER_BYTES_PER_ENTRY} bytes before one entry")


class _Forward:
    """A layer stream as the seekable file tarfile's "r:" mode reads, though only forwards
    (a seek back is refused, as stream mode's would be): tarfile reads each header and each
    entry's data straight from it, where stream mode ("r|") passes every byte through a buffer
    of its own 10 KiB at a time, and copies what is left of it on each read."""

    def __init__(self, stream):
        self._stream = stream
        self._position = 0

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = 0) -> int:
        if whence != 0 or position < self._position:
            raise tarfile.StreamError("a layer's tar is read once, forwards")
        while position > self._position:
            skipped = self._stream.read(min(position - self._position, CHUNK))
            if not skipped:
                break  # the next read finds the end
            self._position += len(skipped)
        return self._position

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream."""
        data = self._stream.read(size)
        if 0 < len(data) < size:
            parts = [data]
            got = len(data)
            while got < size and (more := self._stream.read(size - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self._position += len(data)
        return data

    def chunks(self, size: int):
        """The next `size` bytes, a piece at a time as the stream holds them."""
        while size > 0:
            data = self._stream.read(min(size, CHUNK))
            if not data:
                raise tarfile.ReadError("unexpected end of data")
            self._position += len(data)
            size -= len(data)
            yield data


def open_layer_tar(stream) -> tarfile.TarFile:
    """A tar read once, in order, from a file-like `stream` (see tar_members and member_data)."""
    return _LayerTar.open(fileobj=_Forward(stream), mode="r:", errorlevel=2)


def member_data(archive: tarfile.TarFile, member: tarfile.TarInfo):
    """A regular entry's data, as pieces of at most CHUNK bytes (what tarfile's extractfile
    returns, without its buffers: sparse entries, which need those, never get this far)."""
    archive.fileobj.seek(member.offset_data)
    return archive.fileobj.chunks(member.size)


def tar_members(archive: tarfile.TarFile):
    """The entries of a tar read once in order, without TarFile keeping each one in `.members`
    (a layer of a million entries would otherwise hold them all until the end), and without
    global PAX headers."""
    while (member := archive.next()) is not None:
        archive.members.clear()
        if member.type != tarfile.XGLTYPE:
            yield member
