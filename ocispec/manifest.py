"""Parsing and validating image manifests and indexes (OCI and Docker schema 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import mediatypes as mt
from . import strict_json
from .digest import Digest, InvalidDigest

# Descriptor sizes are int64 on the wire (as in every Go implementation).
MAX_SIZE = 2**63 - 1
# Go's encoding/json matches object keys to fields case-insensitively (and folds ſ to s, K to
# k), so a Go client reads `"Manifests"` as `manifests`, and of `"mediaType"` and `"MediaType"`
# takes the later one. A key that folds to a field's name must be spelled exactly as the field.
FIELD_NAMES = {name.casefold(): name for name in (
    "schemaVersion", "mediaType", "artifactType", "config", "layers", "manifests", "subject", "annotations",
    "digest", "size", "urls", "platform", "data", "architecture", "os", "os.version", "os.features",
    "variant", "features")}


class ManifestInvalid(ValueError):
    """The bytes are not a well-formed manifest of the type they claim."""


class ManifestUnsupported(ValueError):
    """A manifest format Kura refuses (Docker schema 1, unknown media types)."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    platform: dict | None = None
    annotations: dict | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(frozen=True)
class Manifest:
    media_type: str
    blobs: tuple[Descriptor, ...] = ()
    """Config and layers of an image manifest (blobs that must exist in the repository)."""
    children: tuple[Descriptor, ...] = ()
    """Manifests an index points at (must exist in the repository)."""
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES


def _refuse_case_variants(value: dict, where: str) -> None:
    for key in value:
        name = FIELD_NAMES.get(key.casefold())
        if name is not None and key != name:
            raise ManifestInvalid(f"{where}: ambiguous key {key!r}: Go clients read it as {name!r}; "
                                  f"spell it exactly {name!r}")


def parse_descriptor(value: object, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where}: descriptor must be an object")
    _refuse_case_variants(value, where)
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}: mediaType must be a non-empty string")
    try:
        digest = Digest.parse(value.get("digest"))
    except InvalidDigest as exc:
        raise ManifestInvalid(f"{where}: {exc}") from None
    size = value.get("size")
    if not _is_int(size) or not 0 <= size <= MAX_SIZE:
        raise ManifestInvalid(f"{where}: size must be a non-negative 64-bit integer")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid(f"{where}: artifactType must be a string")
    platform = value.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ManifestInvalid(f"{where}: platform must be an object")
    if platform is not None:
        _refuse_case_variants(platform, f"{where}.platform")
    annotations = _annotations(value, where)
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid(f"{where}: urls must be a list of strings")
    return Descriptor(media_type, digest, size, artifact_type, platform, annotations or None, tuple(urls))


def _annotations(value: dict, where: str) -> dict:
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ManifestInvalid(f"{where}: annotations must map strings to strings")
    return annotations


def parse_manifest(data: bytes, content_type: str | None) -> Manifest:
    """Parse manifest bytes as pushed with `Content-Type: content_type`.

    The media type is the document's own `mediaType` when present; a `Content-Type` that
    disagrees with it is an error, as is a document that names neither.
    """
    declared = mt.strip_parameters(content_type) if content_type else None
    if declared in mt.SCHEMA1:
        raise ManifestUnsupported("Docker image manifest schema 1 is obsolete; push schema 2 or OCI")
    try:
        doc = strict_json.loads(data)
    except strict_json.JSONInvalid as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest must be a JSON object")
    _refuse_case_variants(doc, "manifest")
    version = doc.get("schemaVersion")
    if _is_int(version) and version == 1:
        raise ManifestUnsupported("Docker image manifest schema 1 is obsolete; push schema 2 or OCI")
    if not (_is_int(version) and version == 2):
        raise ManifestInvalid("schemaVersion must be the integer 2")

    media_type = doc.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise ManifestInvalid("mediaType must be a string")
    if media_type is None:
        media_type = declared if declared in mt.MANIFESTS else _guess_oci_type(doc)
    if media_type not in mt.MANIFESTS:
        raise ManifestUnsupported(f"unsupported manifest media type {media_type!r}")
    if declared and declared in mt.MANIFESTS and declared != media_type:
        raise ManifestInvalid(f"Content-Type {declared} does not match the manifest's mediaType {media_type}")
    if declared and declared not in mt.MANIFESTS and declared not in ("application/json", "application/octet-stream"):
        raise ManifestUnsupported(f"unsupported manifest Content-Type {declared!r}")
    _refuse_ambiguity(doc, media_type)

    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")
    subject = parse_descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    annotations = _annotations(doc, "manifest")

    if media_type in mt.INDEXES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestInvalid("an index must have a manifests list")
        children = tuple(parse_descriptor(d, f"manifests[{i}]") for i, d in enumerate(entries))
        return Manifest(media_type, children=children, subject=subject,
                        artifact_type=artifact_type, annotations=annotations)

    if "config" not in doc:
        raise ManifestInvalid("an image manifest must have a config descriptor")
    config = parse_descriptor(doc["config"], "config")
    layers = doc.get("layers", [] if media_type == mt.OCI_MANIFEST else None)
    if not isinstance(layers, list):
        raise ManifestInvalid("layers must be a list")
    blobs = (config,) + tuple(parse_descriptor(d, f"layers[{i}]") for i, d in enumerate(layers))
    return Manifest(media_type, blobs=blobs, subject=subject,
                    artifact_type=artifact_type, annotations=annotations)


def _refuse_ambiguity(doc: dict, media_type: str) -> None:
    """CVE-2021-41190: a document with the fields of both an index and an image manifest
    could be read as either, so one digest could mean two different things. Refused as
    distribution does (a null field counts as absent) and as the image-spec advisory allows."""
    if media_type in mt.INDEXES:
        foreign = [key for key in ("config", "layers") if doc.get(key) is not None]
        kind = "an index"
    else:
        foreign = ["manifests"] if doc.get("manifests") is not None else []
        kind = "an image manifest"
    if foreign:
        raise ManifestInvalid(f"ambiguous document: {kind} ({media_type}) must not have "
                              f"{' or '.join(foreign)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _guess_oci_type(doc: dict) -> str | None:
    if "manifests" in doc:
        return mt.OCI_INDEX
    if "config" in doc:
        return mt.OCI_MANIFEST
    return None


def referrer_artifact_type(manifest: Manifest) -> str | None:
    """The artifactType a referrers listing shows for this manifest (image-spec rules)."""
    if manifest.artifact_type:
        return manifest.artifact_type
    if manifest.blobs and not manifest.is_index:
        return manifest.blobs[0].media_type
    return None
