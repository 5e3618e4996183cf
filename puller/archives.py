"""Push sources packed in a tar: `oci-archive:FILE` (an OCI layout in a tar) and
`docker-archive:FILE[:REF]` (what `docker save` writes, legacy layout included).

Both are unpacked into a scratch directory laid out like an OCI layout (`blobs/<alg>/<hex>`),
member by member and by name only (nothing from the archive becomes a path outside it).
A docker archive's uncompressed layers are gzip-compressed there, and a Docker schema 2
manifest is written for them, as `docker push` would."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import zlib
from pathlib import Path

from ocispec import mediatypes as mt

from .layers import DecompressedLayer
from .push import PushError, Source, source_from_layout
from .tarreader import tar_members
from .unpack import MAX_LINK_HOPS

_LAYOUT_MEMBER = re.compile(r"(?:\./)?(oci-layout|index\.json|blobs/sha256/[a-f0-9]{64})")
_CHUNK = 1 << 20
_JSON_LIMIT = 4 << 20  # manifest.json, index.json, image configs


def oci_archive(path: Path, tag: str | None, scratch: Path) -> Source:
    with tarfile.open(path) as archive:
        for member in tar_members(archive):
            match = _LAYOUT_MEMBER.fullmatch(member.name)
            if not match or not member.isreg():
                continue
            if match.group(1) in ("index.json", "oci-layout") and member.size > _JSON_LIMIT:
                raise PushError(f"{path}: {member.name} is implausibly large")
            target = scratch / match.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as src, open(target, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
    if not (scratch / "index.json").exists():
        raise PushError(f"{path} holds no OCI image layout (no index.json)")
    return source_from_layout(scratch, tag)


def _gzip_compressor():
    try:
        from isal import isal_zlib
        return isal_zlib.compressobj(2, isal_zlib.DEFLATED, 31)
    except ImportError:
        return zlib.compressobj(6, zlib.DEFLATED, 31)


def _store(scratch: Path, data_path: Path | None = None, data: bytes | None = None) -> tuple[str, int]:
    """Move bytes into scratch/blobs under their digest; returns (digest, size)."""
    blobs = scratch / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if data is not None:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)
    hasher = hashlib.sha256()
    size = 0
    with open(data_path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    data_path.replace(blobs / hasher.hexdigest())
    return f"sha256:{hasher.hexdigest()}", size


def docker_archive(path: Path, reference: str | None, scratch: Path) -> Source:
    with tarfile.open(path) as archive:
        # Links included: legacy `docker save` links shared layers; they are followed to a
        # regular member of this archive (see _regular).
        members = {_key(m.name): m for m in archive.getmembers() if m.isreg() or m.islnk() or m.issym()}
        if "manifest.json" not in members:
            raise PushError(f"{path} is not a docker archive (no manifest.json)")

        def read_member(name: str):
            return archive.extractfile(_regular(members, name, path))

        entries = _json_member(read_member("manifest.json"), "manifest.json", path)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("Config"), str) and isinstance(e.get("Layers"), list)
                and all(isinstance(x, str) for x in e["Layers"]) for e in entries):
            raise PushError(f"{path}: manifest.json is not a docker-archive manifest")
        if reference is not None:
            entries = [e for e in entries if reference in (e.get("RepoTags") or [])]
        if len(entries) != 1:
            raise PushError(f"{path}: {'no image ' + repr(reference) if reference else 'several images; name one'}"
                            if not entries or reference else f"{path}: several images; name one with :REF")
        entry = entries[0]
        config_file = read_member(entry["Config"])
        config = config_file.read(_JSON_LIMIT + 1)
        if len(config) > _JSON_LIMIT:
            raise PushError(f"{path}: the image config {entry['Config']} is implausibly large")
        diff_ids = (_json_bytes(config, entry["Config"], path).get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise PushError(f"{path}: {entry['Config']} is not an image config with rootfs.diff_ids")
        if len(diff_ids) != len(entry["Layers"]):
            raise PushError(f"{path}: {len(entry['Layers'])} layers but {len(diff_ids)} diff_ids in the config")
        config_digest, config_size = _store(scratch, data=config)
        layers = []
        for number, name in enumerate(entry["Layers"]):
            temp = scratch / f"layer-{number}.tmp"
            with read_member(name) as src, open(temp, "wb") as out:
                diff_id = _gzip_layer(src, out)
            if diff_id != diff_ids[number]:
                raise PushError(f"{path}: layer {name} does not match diff_id {diff_ids[number]} of the config")
            digest, size = _store(scratch, data_path=temp)
            layers.append({"mediaType": mt.DOCKER_LAYER_GZIP, "size": size, "digest": digest})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
                           "config": {"mediaType": mt.DOCKER_CONFIG, "size": config_size, "digest": config_digest},
                           "layers": layers}, indent=3).encode()
    digest, size = _store(scratch, data=manifest)
    return Source(scratch, {"mediaType": mt.DOCKER_MANIFEST, "digest": digest, "size": size})


def _gzip_layer(src, out) -> str:
    """Copy a layer to `out` gzip-compressed (compressing it if it is not already); returns
    the sha256 of its uncompressed tar (its diff_id)."""
    head = src.read(2)
    if head == b"\x1f\x8b":  # already gzip (newer docker save): check it inflates to its diff_id
        stream = DecompressedLayer(_Copying(head, src, out), mt.DOCKER_LAYER_GZIP)
        stream.drain()
        return stream.diff_id
    plain = hashlib.sha256(head)
    compressor = _gzip_compressor()
    out.write(compressor.compress(head))
    while chunk := src.read(_CHUNK):
        plain.update(chunk)
        out.write(compressor.compress(chunk))
    out.write(compressor.flush())
    return f"sha256:{plain.hexdigest()}"


class _Copying:
    """Reads `source` (after `head`, already read from it), writing all it returns to `out`."""

    def __init__(self, head: bytes, source, out):
        self.head, self.source, self.out = head, source, out

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head, b""
        else:
            data = self.source.read(n)
        self.out.write(data)
        return data


def _key(name: str) -> str:
    return posixpath.normpath(name).lstrip("/")


def _regular(members: dict[str, tarfile.TarInfo], name: str, path: Path) -> tarfile.TarInfo:
    """The regular member `name` is, following its symbolic and hard links inside the archive
    (tarfile itself would follow a loop until Python's recursion limit)."""
    current = name
    for _ in range(MAX_LINK_HOPS):
        member = members.get(_key(current))
        if member is None:
            raise PushError(f"{path}: {name} is missing from the archive" if current == name else
                            f"{path}: {name} links to {current}, which is not in the archive")
        if member.isreg():
            return member
        target = member.linkname
        if member.issym() and not target.startswith("/"):
            target = posixpath.join(posixpath.dirname(member.name), target)
        current = target
    raise PushError(f"{path}: {name} is a link that goes round in circles (or through more than {MAX_LINK_HOPS})")


def _json_member(source, name: str, path: Path):
    data = source.read(_JSON_LIMIT + 1)
    if len(data) > _JSON_LIMIT:
        raise PushError(f"{path}: {name} is implausibly large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise PushError(f"{path}: {name} is not JSON (or is nested too deeply)") from None


def _json_bytes(data: bytes, name: str, path: Path) -> dict:
    document = _json_member(io.BytesIO(data), name, path)
    if not isinstance(document, dict):
        raise PushError(f"{path}: {name} is not a JSON object")
    return document


def split_archive_target(text: str) -> tuple[Path, str | None]:
    """`FILE.tar[:REF]` -> (FILE.tar, REF)."""
    file, sep, ref = text.partition(".tar:")
    return (Path(file + ".tar"), ref) if sep else (Path(text), None)
