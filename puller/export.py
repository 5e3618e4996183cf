"""`--output oci:DIR[:TAG]`: a standalone OCI image layout that skopeo and umoci read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ocispec import mediatypes as mt
from ocispec.digest import Digest

from .store import REF_NAME, Store


def parse_oci_target(target: str) -> tuple[Path, str | None]:
    if not target.startswith("oci:"):
        raise ValueError(f"unsupported output {target!r}; use oci:DIR[:TAG]")
    rest = target[4:]
    directory, sep, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not sep:
        directory, tag = rest, ""
    if not directory:
        raise ValueError("oci: output needs a directory")
    return Path(directory), tag or None


def export_oci(store: Store, descriptor: dict, directory: Path, tag: str) -> None:
    """Write (or add to) an OCI layout holding the image `descriptor` under `tag`."""
    (directory / "blobs").mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for digest in store.reachable(Digest.parse(descriptor["digest"])):
        source = store.blob_path(digest)
        target = directory / "blobs" / digest.algorithm / digest.encoded
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    index_path = directory / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else \
        {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
    entry = {k: v for k, v in descriptor.items() if k != "annotations"}
    entry["annotations"] = {REF_NAME: tag}
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag] + [entry]
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
