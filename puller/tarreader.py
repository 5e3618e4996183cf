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


def open_layer_tar(stream) -> tarfile.TarFile:
    """A tar read once, in order, from a file-like `stream` (see tar_members)."""
    return _LayerTar.open(fileobj=stream, mode="r|", errorlevel=2)


def tar_members(archive: tarfile.TarFile):
    """The entries of a tar read once in order, without TarFile keeping each one in `.members`
    (a layer of a million entries would otherwise hold them all until the end), and without
    global PAX headers."""
    while (member := archive.next()) is not None:
        archive.members.clear()
        if member.type != tarfile.XGLTYPE:
            yield member
