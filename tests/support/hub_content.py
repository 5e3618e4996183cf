"""What the emulated Docker Hub (tests/support/fake_hub.py) serves, written into a Kura store
through the storage layer: the shared images in Docker Hub's `library/` layout, a redis index
with buildkit-style attestation manifests, and a private repository.

The store is built once per pytest session (`seeded_store`) and each hub gets a copy whose blob
files are hard links to it (`copy_store`): a hub costs a few dozen small file copies, not 80 MB.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ocispec import mediatypes as mt
from ocispec.digest import Digest
from storage import FilesystemDriver, manifests

from .layouts import tag_digest
from .paths import IMAGES, require_shared

IN_TOTO = "application/vnd.in-toto+json"
SPDX = "https://spdx.dev/Document"
PROVENANCE = "https://slsa.dev/provenance/v0.2"


@dataclass(frozen=True)
class Seeded:
    """Digests of what a fresh hub serves."""
    redis_index: str        # library/redis:7 and :latest, an OCI index
    redis_amd64: str        # its linux/amd64 entry: the shared redis image
    redis_arm64: str        # its linux/arm64/v8 entry: the shared busybox arm64 image
    redis_attestations: dict[str, str]  # platform manifest digest -> its attestation manifest
    debian: str             # library/debian:bookworm
    busybox_index: str      # library/busybox:latest, the shared two-platform index
    busybox_amd64: str
    private: str            # acme/private:1 (the busybox amd64 image), alice only


# ------------------------------------------------------------------- writing into a store

def compact(document: dict) -> bytes:
    """JSON as registries store it: no spaces, keys in the order given."""
    return json.dumps(document, separators=(",", ":")).encode()


def _blob_file(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


async def put_blob(store: FilesystemDriver, repository: str, data: bytes) -> dict:
    """Store `data` and link it into `repository`; its descriptor (digest and size)."""
    digest = Digest.of_bytes(data)
    await store.put_small_blob(data, digest)
    await store.link_blob(repository, digest)
    return {"digest": str(digest), "size": len(data)}


async def _put_blob_file(store: FilesystemDriver, repository: str, source: Path, digest: str) -> None:
    """A large blob from a file, copied (never linked: the shared images stay untouched)."""
    parsed = Digest.parse(digest)
    target = store.layout.blob(parsed)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = store.layout.tmp / f"seed-{uuid.uuid4().hex}"
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    await store.link_blob(repository, parsed)


async def put_manifest(store: FilesystemDriver, repository: str, data: bytes, media_type: str,
                       tags: tuple[str, ...] = ()) -> str:
    """Store a manifest with Kura's push-time checks (its blobs and children must be there)."""
    digest, _ = await manifests.put_manifest(store, repository, data, media_type, tags=tags)
    return str(digest)


async def copy_from_layout(store: FilesystemDriver, layout: Path, digest: str, repository: str,
                           tags: tuple[str, ...] = ()) -> str:
    """An image or index of an OCI layout, with everything it references, into `repository`."""
    data = _blob_file(layout, digest).read_bytes()
    document = json.loads(data)
    for child in document.get("manifests", []):
        await copy_from_layout(store, layout, child["digest"], repository)
    if "config" in document:
        for descriptor in [document["config"], *document["layers"]]:
            await _put_blob_file(store, repository, _blob_file(layout, descriptor["digest"]), descriptor["digest"])
    media_type = document.get("mediaType") or (mt.OCI_INDEX if "manifests" in document else mt.OCI_MANIFEST)
    return await put_manifest(store, repository, data, media_type, tags)


def small_layer(files: dict[str, bytes]) -> bytes:
    """A gzip tar layer holding `files` (path -> content), reproducible byte for byte."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


async def put_small_image(store: FilesystemDriver, repository: str, files: dict[str, bytes],
                          tags: tuple[str, ...] = (), architecture: str = "amd64") -> str:
    """A real one-layer linux image (config with the layer's diff_id), pushed into `repository`."""
    layer = small_layer(files)
    diff_id = str(Digest.of_bytes(gzip.decompress(layer)))
    config = compact({"architecture": architecture, "os": "linux", "config": {"Cmd": ["sh"]},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    manifest = compact({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, **await put_blob(store, repository, config)},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, **await put_blob(store, repository, layer)}]})
    return await put_manifest(store, repository, manifest, mt.OCI_MANIFEST, tags)


async def put_attestation(store: FilesystemDriver, repository: str, subject: str, purl: str) -> str:
    """An attestation manifest as buildkit attaches one per platform: an OCI image of platform
    unknown/unknown whose layers are in-toto statements (an SPDX SBOM and SLSA provenance)
    about `subject`."""
    hex_digest = subject.split(":", 1)[1]
    statements = [
        (SPDX, {"spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT", "name": "sbom", "packages": []}),
        (PROVENANCE, {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1",
                      "metadata": {"buildStartedOn": "2024-01-01T00:00:00Z"}}),
    ]
    layers = []
    for predicate_type, predicate in statements:
        statement = compact({"_type": "https://in-toto.io/Statement/v0.1", "predicateType": predicate_type,
                             "subject": [{"name": purl, "digest": {"sha256": hex_digest}}],
                             "predicate": predicate})
        layers.append({"mediaType": IN_TOTO, **await put_blob(store, repository, statement),
                       "annotations": {"in-toto.io/predicate-type": predicate_type}})
    config = compact({"architecture": "unknown", "os": "unknown", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}})
    manifest = compact({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                        "config": {"mediaType": mt.OCI_CONFIG, **await put_blob(store, repository, config)},
                        "layers": layers})
    return await put_manifest(store, repository, manifest, mt.OCI_MANIFEST)


# ------------------------------------------------------------------- the seeded store

async def _seed(store: FilesystemDriver) -> Seeded:
    redis, busybox, debian = IMAGES / "redis", IMAGES / "busybox-multiarch", IMAGES / "debian"
    amd64 = await copy_from_layout(store, redis, tag_digest(redis, "7"), "library/redis")
    arm64 = await copy_from_layout(store, busybox, tag_digest(busybox, "latest-arm64"), "library/redis")
    platforms = [(amd64, {"architecture": "amd64", "os": "linux"}, "amd64"),
                 (arm64, {"architecture": "arm64", "os": "linux", "variant": "v8"}, "arm64v8")]
    entries, attestations = [], []
    for digest, platform, bashbrew_arch in platforms:
        size = (await store.stat_blob(Digest.parse(digest))).size
        entries.append({"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": size, "platform": platform,
                        "annotations": {"com.docker.official-images.bashbrew.arch": bashbrew_arch,
                                        "org.opencontainers.image.version": "7.0.15"}})
        variant = f"%2F{platform['variant']}" if "variant" in platform else ""
        purl = f"pkg:docker/library/redis@7?platform=linux%2F{platform['architecture']}{variant}"
        attestation = await put_attestation(store, "library/redis", digest, purl)
        attestations.append((digest, attestation))
    for subject, attestation in attestations:  # after every platform, as buildkit orders them
        size = (await store.stat_blob(Digest.parse(attestation))).size
        entries.append({"mediaType": mt.OCI_MANIFEST, "digest": attestation, "size": size,
                        "platform": {"architecture": "unknown", "os": "unknown"},
                        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                        "vnd.docker.reference.digest": subject}})
    index = compact({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries})
    redis_index = await put_manifest(store, "library/redis", index, mt.OCI_INDEX, ("7", "latest"))
    busybox_amd64 = tag_digest(busybox, "latest-amd64")
    return Seeded(
        redis_index=redis_index, redis_amd64=amd64, redis_arm64=arm64, redis_attestations=dict(attestations),
        debian=await copy_from_layout(store, debian, tag_digest(debian, "bookworm"), "library/debian", ("bookworm",)),
        busybox_index=await copy_from_layout(store, busybox, tag_digest(busybox, "latest"), "library/busybox",
                                             ("latest",)),
        busybox_amd64=busybox_amd64,
        private=await copy_from_layout(store, busybox, busybox_amd64, "acme/private", ("1",)),
    )


# The seed this process built or found last: later hubs reuse it wherever their tmp_path is.
_last_seed: list[Path] = []


async def seeded_store(cache: Path) -> tuple[Path, Seeded]:
    """The seeded store under `cache`, or the one this process used last if it still exists
    (built on first use; several builders at once are safe: each builds aside and the first
    rename wins). Returns its root and what it holds."""
    ready = _last_seed[0] if _last_seed and _last_seed[0].is_dir() else cache / "seed"
    if not ready.is_dir():
        require_shared()
        cache.mkdir(parents=True, exist_ok=True)
        building = cache / f"building-{uuid.uuid4().hex}"
        seeded = await _seed(FilesystemDriver(building / "store"))
        (building / "seeded.json").write_text(json.dumps(asdict(seeded)))
        try:
            os.rename(building, ready)
        except OSError:
            shutil.rmtree(building, ignore_errors=True)  # another builder finished first
    _last_seed[:] = [ready]
    return ready / "store", Seeded(**json.loads((ready / "seeded.json").read_text()))


def copy_store(seed: Path, root: Path) -> None:
    """A private copy of a seeded store: blob files hard-linked (Kura never writes a stored
    blob in place, it renames new files over), everything else copied."""
    blobs = seed / "blobs"

    def link_or_copy(source: str, target: str) -> None:
        if Path(source).is_relative_to(blobs):
            try:
                os.link(source, target)
                return
            except OSError:
                pass  # another filesystem: copy instead
        shutil.copy2(source, target)

    shutil.copytree(seed, root, copy_function=link_or_copy)
