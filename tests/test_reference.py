"""Docker reference grammar and normalisation."""

import pytest

from ocispec.reference import InvalidReference, Reference, names_registry

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("text, expected", [
    ("redis", "docker.io/library/redis:latest"),
    ("redis:7", "docker.io/library/redis:7"),
    ("library/redis", "docker.io/library/redis:latest"),
    ("user/app:1.0", "docker.io/user/app:1.0"),
    ("docker.io/redis", "docker.io/library/redis:latest"),
    ("index.docker.io/redis", "docker.io/library/redis:latest"),
    ("registry-1.docker.io/library/redis:7", "docker.io/library/redis:7"),
    ("localhost/x", "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("127.0.0.1:5000/ns/repo:tag", "127.0.0.1:5000/ns/repo:tag"),
    (f"host.example:443/ns/repo:tag@{DIGEST}", f"host.example:443/ns/repo:tag@{DIGEST}"),
    (f"redis@{DIGEST}", f"docker.io/library/redis@{DIGEST}"),
    ("ghcr.io/a/b/c", "ghcr.io/a/b/c:latest"),
    ("[::1]:5000/x", "[::1]:5000/x:latest"),
])
def test_normalisation(text, expected):
    assert str(Reference.parse(text)) == expected


def test_parts():
    ref = Reference.parse(f"localhost:5000/ns/repo:v1@{DIGEST}")
    assert (ref.domain, ref.repository, ref.tag, str(ref.digest)) == ("localhost:5000", "ns/repo", "v1", DIGEST)
    assert ref.reference == DIGEST
    assert Reference.parse("redis").reference == "latest"


@pytest.mark.parametrize("text", ["", " redis", "Redis", "redis:", "redis:-bad", "redis@sha256:abc",
                                  "a//b", "host:5000/", "redis:" + "t" * 129, "UPPER/Case"])
def test_invalid(text):
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_uppercase_message():
    with pytest.raises(InvalidReference, match="lowercase"):
        Reference.parse("Redis")


@pytest.mark.parametrize("text, named", [
    ("redis", False), ("redis:7", False), ("me/app:1", False), ("library/redis@sha256:" + "a" * 64, False),
    ("localhost/x", True), ("localhost:5000/redis", True), ("docker.io/redis", True), ("127.0.0.1:5000/a/b:1", True),
    ("ghcr.io/org/app@sha256:" + "a" * 64, True), ("localhost", False), ("Registry/x", True),
])
def test_names_registry_tells_a_host_from_a_short_name(text, named):
    assert names_registry(text) is named
