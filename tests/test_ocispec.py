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


def _index_desc():
    return desc(mt.OCI_MANIFEST, 100)


@pytest.mark.parametrize("doc, content_type", [
    ({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [_index_desc()], "config": desc()}, mt.OCI_INDEX),
    ({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [_index_desc()],
      "layers": [desc(mt.OCI_LAYER_GZIP, 10)]}, mt.OCI_INDEX),
    ({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": [_index_desc()],
      "layers": []}, mt.DOCKER_MANIFEST_LIST),
    ({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [],
      "manifests": [_index_desc()]}, mt.OCI_MANIFEST),
    ({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST, "config": desc(mt.DOCKER_CONFIG), "layers": [],
      "manifests": []}, mt.DOCKER_MANIFEST),
    # No mediaType: whatever the Content-Type says, a document with both shapes is refused.
    ({"schemaVersion": 2, "config": desc(), "layers": [], "manifests": [_index_desc()]}, mt.OCI_MANIFEST),
    ({"schemaVersion": 2, "config": desc(), "layers": [], "manifests": [_index_desc()]}, mt.OCI_INDEX),
    ({"schemaVersion": 2, "config": desc(), "layers": [], "manifests": [_index_desc()]}, "application/json"),
    ({"schemaVersion": 2, "config": desc(), "manifests": [_index_desc()]}, None),
])
def test_ambiguous_documents_are_invalid(doc, content_type):
    """CVE-2021-41190: one digest must not read as both an image manifest and an index."""
    with pytest.raises(ManifestInvalid, match="ambiguous"):
        parse_manifest(json.dumps(doc).encode(), content_type)


@pytest.mark.parametrize("doc", [
    {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [], "Manifests": [_index_desc()]},
    {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [], "MANIFESTS": []},
    {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [], "manife\u017fts": []},
    {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [], "Config": desc()},
    {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [], "LAYERS": []},
    {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "MediaType": mt.OCI_INDEX, "config": desc(), "layers": []},
    {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {**desc(), "Digest": "sha256:" + "b" * 64},
     "layers": []},
    {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
     "manifests": [{**_index_desc(), "platform": {"os": "linux", "architecture": "amd64", "Architecture": "arm64"}}]},
])
def test_keys_that_go_reads_as_another_field_are_ambiguous(doc):
    """Go's encoding/json matches keys case-insensitively (ſ = s): `Manifests` is `manifests` there."""
    with pytest.raises(ManifestInvalid, match="ambiguous key"):
        parse_manifest(json.dumps(doc).encode(), None)


def test_other_keys_and_annotation_names_are_free():
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [],
           "annotations": {"Config": "x", "MediaType": "y"}, "x-Custom": 1}
    assert parse_manifest(json.dumps(doc).encode(), None).annotations == {"Config": "x", "MediaType": "y"}


def test_null_fields_of_the_other_shape_are_not_ambiguous():
    # As distribution: a null `config`/`layers` in an index (or `manifests` in a manifest) is absent.
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [], "config": None, "layers": None}
    assert parse_manifest(json.dumps(index).encode(), mt.OCI_INDEX).is_index
    image = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [], "manifests": None}
    assert not parse_manifest(json.dumps(image).encode(), mt.OCI_MANIFEST).is_index


def _image(**extra) -> dict:
    return {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": desc(), "layers": [], **extra}


@pytest.mark.parametrize("data", [
    json.dumps(_image()).encode()[:-1] + b', "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",  # nesting depth 1000
    b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",     # far beyond the recursion limit
    json.dumps(_image()).encode()[:-1] + b', "x": ' + b"9" * 5000 + b"}",       # past int()'s digit limit
    json.dumps(_image()).encode()[:-1] + b', "x": ' + b"9" * 100 + b"}",        # a number no manifest needs
    json.dumps(_image()).encode()[:-1] + b', "x": NaN}',                        # not JSON
    json.dumps(_image()).encode()[:-1] + b', "x": -Infinity}',
    b"\xef\xbb\xbf" + json.dumps(_image()).encode(),                              # UTF-8 byte order mark
    json.dumps(_image()).encode("utf-16"),                                        # not UTF-8
    json.dumps(_image()).encode("utf-16-le"),
    json.dumps(_image()).encode("utf-32"),
])
def test_hostile_or_non_strict_json_is_invalid(data):
    with pytest.raises(ManifestInvalid):
        parse_manifest(data, mt.OCI_MANIFEST)


def test_reasonable_nesting_in_extension_fields_is_fine():
    data = json.dumps(_image(extension=json.loads("[" * 30 + "]" * 30))).encode()
    assert parse_manifest(data, mt.OCI_MANIFEST).media_type == mt.OCI_MANIFEST


@pytest.mark.parametrize("version", [2.0, True, "2", None, [2]])
def test_schema_version_must_be_the_integer_2(version):
    with pytest.raises(ManifestInvalid, match="schemaVersion"):
        parse_manifest(json.dumps(_image(schemaVersion=version)).encode(), mt.OCI_MANIFEST)


def test_descriptor_size_must_fit_in_int64():
    assert parse_manifest(json.dumps(_image(config=desc(size=2**63 - 1))).encode(), mt.OCI_MANIFEST)
    with pytest.raises(ManifestInvalid, match="size"):
        parse_manifest(json.dumps(_image(config=desc(size=2**63))).encode(), mt.OCI_MANIFEST)
