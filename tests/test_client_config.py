"""registries.conf, Docker credentials, platforms and challenges: the client's parsers."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from ocispec.reference import Reference
from puller import credentials
from puller.platform import Platform, choose
from puller.registries import Blocked, Endpoint, Registries, RegistriesConfError
from puller.transport import parse_challenge

CONF = """
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "127.0.0.1:5000"
insecure = true
[[registry.mirror]]
location = "mirror.local/hub"

[[registry]]
prefix = "docker.io/library/debian"
location = "debian-mirror.local:443/deb"

[[registry]]
location = "quay.io"
blocked = true
"""


def test_registries_conf_rewrites_and_mirrors():
    registries = Registries.parse(CONF)
    assert registries.endpoints(Reference.parse("redis")) == [
        Endpoint("mirror.local", "hub/library/redis", False), Endpoint("127.0.0.1:5000", "library/redis", True)]
    assert registries.endpoints(Reference.parse("debian:bookworm")) == [
        Endpoint("debian-mirror.local:443", "deb", False)]  # the longest prefix wins
    assert registries.endpoints(Reference.parse("ghcr.io/a/b")) == [Endpoint("ghcr.io", "a/b")]
    with pytest.raises(Blocked):
        registries.endpoints(Reference.parse("quay.io/x/y"))


def test_prefix_matches_whole_components():
    registries = Registries.parse('[[registry]]\nprefix = "example.com/foo"\nlocation = "other.com/bar"\n')
    assert registries.endpoints(Reference.parse("example.com/foo/x")) == [Endpoint("other.com", "bar/x")]
    assert registries.endpoints(Reference.parse("example.com/foobar")) == [Endpoint("example.com", "foobar")]


def test_docker_hub_api_host_and_plain_http():
    hub = Registries().endpoints(Reference.parse("redis"))[0]
    assert hub.api_host == "registry-1.docker.io" and not hub.plain_http_allowed
    assert Endpoint("localhost:5000", "x").plain_http_allowed
    assert Endpoint("127.0.0.1:5000", "x").plain_http_allowed
    assert not Endpoint("registry.example", "x").plain_http_allowed
    assert Endpoint("registry.example", "x", insecure=True).plain_http_allowed


def test_registries_conf_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    conf = tmp_path / "env.conf"
    conf.write_text(CONF)
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    assert Registries.load().source == conf
    with pytest.raises(RegistriesConfError, match="no such file"):
        Registries.load(tmp_path / "missing.conf")
    with pytest.raises(RegistriesConfError):
        Registries.parse("[[registry]]\ninsecure = true\n")


def write_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json"


def test_credentials_from_auths(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    write_config(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpass").decode()},
        "localhost:5000": {"auth": base64.b64encode(b"me:p:with:colons").decode()},
        "https://registry.example": {"username": "u", "password": "p"}}})
    assert credentials.lookup("docker.io") == credentials.Credentials("hubuser", "hubpass")
    assert credentials.lookup("registry-1.docker.io") == credentials.Credentials("hubuser", "hubpass")
    assert credentials.lookup("localhost:5000") == credentials.Credentials("me", "p:with:colons")
    assert credentials.lookup("registry.example") == credentials.Credentials("u", "p")
    assert credentials.lookup("elsewhere.example") is None
    assert "p:with:colons" not in repr(credentials.lookup("localhost:5000"))


def test_credential_helpers(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-kuratest"
    helper.write_text("#!/bin/sh\nread server\n"
                      'if [ "$server" = "helped.example" ]; then echo \'{"Username":"h","Secret":"s"}\'; '
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    write_config(tmp_path, {"credHelpers": {"helped.example": "kuratest"}, "credsStore": "kuratest"})
    assert credentials.lookup("helped.example") == credentials.Credentials("h", "s")
    assert credentials.lookup("other.example") is None  # the store has nothing for it
    write_config(tmp_path, {"credsStore": "absent"})
    with pytest.raises(credentials.CredentialsError, match="not installed"):
        credentials.lookup("x.example")


def test_platform_choice():
    index = {"manifests": [
        {"digest": "a", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "b", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "c", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "att", "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]}
    assert choose(index, Platform.parse("linux/amd64"))["digest"] == "a"
    assert choose(index, Platform.parse("linux/arm64"))["digest"] == "b"
    assert choose(index, Platform.parse("linux/arm/v7"))["digest"] == "c"
    with pytest.raises(LookupError, match="available: linux/amd64, linux/arm/v7, linux/arm64/v8"):
        choose(index, Platform.parse("linux/arm/v6"))
    with pytest.raises(ValueError):
        Platform.parse("linux")
    assert Platform.host().os == "linux"


def test_challenge_parsing():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/redis:pull,push",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/redis:pull,push", "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_concurrent_logins_keep_config_json_valid(tmp_path):
    import threading
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"auths": {}, "psFormat": "x"}))
    errors = []

    def login(host):
        try:
            for i in range(50):
                credentials.save(host, credentials.Credentials("u", f"p{i}"), path)
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=login, args=(f"r{n}.example",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    config = json.loads(path.read_text())
    assert config["psFormat"] == "x" and sorted(config["auths"]) == [f"r{n}.example" for n in range(4)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.lookup("r0.example", path) == credentials.Credentials("u", "p49")
    assert os.listdir(path.parent) == ["config.json"]  # no lock file (or temp file) left behind


def test_new_login_replaces_every_older_entry_for_the_host(tmp_path):
    path = tmp_path / "config.json"
    old = base64.b64encode(b"u:old").decode()
    path.write_text(json.dumps({"auths": {"https://reg.example:5000": {"auth": old}}}))
    credentials.save("reg.example:5000", credentials.Credentials("u", "new"), path)
    assert credentials.lookup("reg.example:5000", path) == credentials.Credentials("u", "new")
    assert credentials.erase("reg.example:5000", path)
    assert credentials.lookup("reg.example:5000", path) is None
