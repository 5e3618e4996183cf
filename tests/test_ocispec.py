"""Unit tests of the shared protocol vocabulary."""

import json

import pytest

from ocispec import mediatypes as mt
from ocispec.digest import Digest, InvalidDigest
from ocispec.manifest import ManifestInvalid, ManifestUnsupported, parse_manifest, referrer_artifact_type
from ocispec.names import is_valid_name, is_valid_tag

HEX = "a" * 64


def test_digest_parse_and_str():
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.encoded, str(d)) == ("sha256", HEX, f"sha256:{HEX}")
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"


@pytest.mark.parametrize("text", [
    "", "sha256", f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", f"sha256:{HEX}/..", f"md5:{'a' * 32}",
    f"SHA256:{HEX}", "sha256:" + "a" * 128, f"sha256:{HEX} ", "sha512:" + "b" * 64, None, 5,
])
def test_digest_rejects(text):
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_digest_of_bytes():
    assert str(Digest.of_bytes(b"")) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("name", ["a", "library/redis", "a.b/c_d/e__f/g-h/i--j", "0/1/2", "x" * 255])
def test_valid_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "A", "a/", "/a", "a//b", "a/../b", "..", "a/.b", "_a", "a_", "a___b",
                                  "a-", "a b", "x" * 256, "a/_manifests"])
def test_invalid_names(name):
    assert not is_valid_name(name)


def test_tags():
    assert is_valid_tag("latest") and is_valid_tag("_x") and is_valid_tag("V1.0-rc_2") and is_valid_tag("a" * 128)
    for bad in ("", ".x", "-x", "a" * 129, "a/b", "a:b", "..", "sha256:x"):
        assert not is_valid_tag(bad), bad


def desc(media_type="application/vnd.oci.image.config.v1+json", size=2, **extra):
    return {"mediaType": media_type, "digest": f"sha256:{HEX}", "size": size, **extra}


def test_parse_image_manifest():
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(),
           "layers": [desc(mt.OCI_LAYER_GZIP, 10)], "annotations": {"a": "b"},
           "subject": desc(mt.OCI_MANIFEST, 100)}
    m = parse_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST)
    assert m.media_type == mt.OCI_MANIFEST and not m.is_index
    assert [b.size for b in m.blobs] == [2, 10]
    assert m.subject.size == 100
    assert m.annotations == {"a": "b"}
    assert referrer_artifact_type(m) == "application/vnd.oci.image.config.v1+json"


def test_media_type_from_content_type_when_document_omits_it():
    doc = {"schemaVersion": 2, "config": desc(), "layers": []}
    assert parse_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST).media_type == mt.OCI_MANIFEST
    index = {"schemaVersion": 2, "manifests": []}
    assert parse_manifest(json.dumps(index).encode(), None).media_type == mt.OCI_INDEX


def test_parse_rejects():
    base = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": []}
    cases = [
        ({**base, "config": desc(size=-1)}, ManifestInvalid),
        ({**base, "config": desc(size=True)}, ManifestInvalid),
        ({**base, "layers": [{"digest": f"sha256:{HEX}", "size": 1}]}, ManifestInvalid),
        ({**base, "annotations": {"a": 1}}, ManifestInvalid),
        ({**base, "layers": {}}, ManifestInvalid),
        ({**base, "mediaType": mt.DOCKER_MANIFEST}, ManifestInvalid),  # disagrees with Content-Type
        ({**base, "schemaVersion": 1}, ManifestUnsupported),
        ({**base, "mediaType": "application/vnd.example+json"}, ManifestUnsupported),
    ]
    for doc, error in cases:
        with pytest.raises(error):
            parse_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST)
    with pytest.raises(ManifestUnsupported):
        parse_manifest(b"{}", mt.DOCKER_SCHEMA1_SIGNED)
    with pytest.raises(ManifestInvalid):
        parse_manifest(b"\xff\xfe", mt.OCI_MANIFEST)


def test_docker_manifest_requires_layers():
    doc = {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST, "config": desc(mt.DOCKER_CONFIG)}
    with pytest.raises(ManifestInvalid):
        parse_manifest(json.dumps(doc).encode(), mt.DOCKER_MANIFEST)
