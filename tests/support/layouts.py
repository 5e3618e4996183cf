"""Reading the shared OCI image layouts in tests."""

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
