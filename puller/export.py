"""`--output oci:DIR[:TAG]` (a standalone OCI image layout that skopeo and umoci read) and
`--output docker-archive:FILE.tar` (what `docker save` writes)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from ocispec import mediatypes as mt
from ocispec.digest import Digest

from .layers import DEFAULT_MAX_LAYER_BYTES, DecompressedLayer
from .limits import MANIFEST_LIMIT
from .store import REF_NAME, Store


def parse_oci_target(target: str) -> tuple[Path, str | None]:
    if not target.startswith("oci:"):
        raise ValueError(f"unsupported output {target!r}; use oci:DIR[:TAG] or docker-archive:FILE.tar")
    rest = target[4:]
    directory, sep, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not sep:
        directory, tag = rest, ""
    if not directory:
        raise ValueError("oci: output needs a directory")
    return Path(directory), tag or None


def check_output(target: str) -> None:
    """Refuse, before anything is downloaded, an output that cannot be written."""
    if target.startswith("docker-archive:"):
        name = target.split(":", 1)[1]
        if not name:
            raise ValueError("docker-archive: output needs a file name (docker-archive:FILE.tar)")
        file = Path(name)
        if file.is_dir():
            raise ValueError(f"{file} is a directory; docker-archive: wants a file name")
        _check_writable_directory(file.parent, file.parent)
        return
    directory, _ = parse_oci_target(target)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the layout's missing directories are created
    _check_writable_directory(existing, directory)


def _check_writable_directory(directory: Path, wanted: Path) -> None:
    if not directory.exists():
        raise ValueError(f"cannot write {wanted}: {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"cannot write {wanted}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {wanted}: {directory} is not writable")


def export_oci(store: Store, descriptor: dict, directory: Path, tag: str) -> None:
    """Write (or add to) an OCI layout holding the image `descriptor` under `tag`."""
    (directory / "blobs").mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for digest in store.reachable(Digest.parse(descriptor["digest"])):
        source = store.blob_path(digest)
        target = directory / "blobs" / digest.algorithm / digest.encoded
        if target.exists() or not source.exists():
            continue  # an index's attestation entries are not pulled
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


def export_docker_archive(store: Store, descriptor: dict, path: Path, repo_tag: str | None,
                          max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> None:
    """A `docker save` archive: manifest.json, the config as <hex>.json, and each layer
    uncompressed as <diff_id hex>/layer.tar (what `docker load` and skopeo read)."""
    manifest = store.read_json(Digest.parse(descriptor["digest"]), MANIFEST_LIMIT, "manifest")
    if "layers" not in manifest:
        raise ValueError("docker-archive: pick one platform (the reference is an index)")
    tmp = path.with_name(path.name + ".partial")
    try:
        _write_docker_archive(store, manifest, tmp, repo_tag, max_layer_bytes)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a layer refused half-way leaves no half-written archive
        raise
    os.replace(tmp, path)


def _write_docker_archive(store: Store, manifest: dict, path: Path, repo_tag: str | None,
                          max_layer_bytes: int) -> None:
    import tarfile  # here, not at the top: `kura pull` and `kura push` import this module without writing archives

    config_digest = Digest.parse(manifest["config"]["digest"])
    config_name = f"{config_digest.encoded}.json"
    layer_names = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(store.blob_path(config_digest), arcname=config_name)
        for layer in manifest["layers"]:
            with tempfile.TemporaryFile(dir=store.scratch) as plain:
                with open(store.blob_path(Digest.parse(layer["digest"])), "rb") as raw:
                    stream = DecompressedLayer(raw, layer["mediaType"], max_layer_bytes)
                    while chunk := stream.read(1 << 20):
                        plain.write(chunk)
                name = f"{stream.diff_id.split(':', 1)[1]}/layer.tar"
                info = tarfile.TarInfo(name)
                info.size = plain.tell()
                info.mode = 0o644
                plain.seek(0)
                archive.addfile(info, plain)
                layer_names.append(name)
        entry = {"Config": config_name, "RepoTags": [repo_tag] if repo_tag else [], "Layers": layer_names}
        data = json.dumps([entry]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        info.mode = 0o644
        archive.addfile(info, io.BytesIO(data))
