"""Reading the shared OCI image layouts in tests."""

import gzip
import hashlib
import json
from pathlib import Path


def tag_digest(layout: Path, tag: str) -> str:
    """The manifest digest an OCI layout's index.json names for `tag` (exactly one entry)."""
    index = json.loads((layout / "index.json").read_text())
    entries = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(entries) == 1, f"{layout}/index.json: {len(entries)} entries for tag {tag!r}: {index}"
    return entries[0]["digest"]


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, hex_ = digest.split(":", 1)
    return layout / "blobs" / algorithm / hex_


def reachable_blobs(layout: Path, digest: str) -> set[str]:
    """Hex digests of the manifest `digest` and of everything it references, recursively."""
    found = {digest.split(":", 1)[1]}
    document = json.loads(blob_path(layout, digest).read_bytes())
    for child in document.get("manifests", []):
        found |= reachable_blobs(layout, child["digest"])
    for descriptor in ([document["config"]] if "config" in document else []) + document.get("layers", []):
        found.add(descriptor["digest"].split(":", 1)[1])
    return found


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assert_layout_matches(source: Path, copy: Path, tag: str) -> None:
    """`copy` (written by skopeo) holds exactly the blobs reachable from `tag` in `source`, byte for byte."""
    want = tag_digest(source, tag)
    got = tag_digest(copy, tag)
    assert got == want, f"skopeo wrote {got} for {tag!r} into {copy}/index.json, source has {want}"
    copied = {p.name: file_sha256(p) for p in (copy / "blobs" / "sha256").iterdir()}
    for name, actual in copied.items():
        assert actual == name, f"{copy}: blob {name} hashes to {actual}"
        original = source / "blobs" / "sha256" / name
        assert original.is_file(), f"{copy}: blob {name} is not in the source layout {source}"
        assert file_sha256(original) == actual
    expected = reachable_blobs(source, want)
    assert set(copied) == expected, (f"missing: {sorted(expected - set(copied))}, "
                                     f"extra: {sorted(set(copied) - expected)}")


def put_blob(blobs: Path, data: bytes) -> dict:
    """`data` stored in a layout's blobs/sha256 folder; its digest and size, as a descriptor has them."""
    hex_ = hashlib.sha256(data).hexdigest()
    (blobs / hex_).write_bytes(data)
    return {"digest": f"sha256:{hex_}", "size": len(data)}


def write_layout(folder: Path, tag: str, layer: bytes, config: dict) -> str:
    """A one-layer OCI image layout at `folder` whose index names it `tag`; returns the
    manifest digest. `layer` goes in as it is: a gzip-compressed tar (skopeo compresses an
    uncompressed layer on its way to a registry, so its digest would change)."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict:
        return put_blob(blobs, data)

    layer_descriptor = put(layer)
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config = dict(config, rootfs={"type": "layers", "diff_ids": [diff_id]})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **put(json.dumps(config, sort_keys=True).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_descriptor}],
    }, sort_keys=True).encode()
    manifest_descriptor = put(manifest)
    (folder / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (folder / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_descriptor,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return manifest_descriptor["digest"]
