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
