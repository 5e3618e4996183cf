"""`[[proxy]]` parsing and the routing of names to proxies (pure functions)."""

from __future__ import annotations

import pytest

from registry import config as server_config
from registry.proxy.config import ProxyConfigError, parse
from registry.proxy.routing import Router


def router(*entries: dict) -> Router:
    return Router(parse(list(entries)))


HUB = {"prefix": "docker.io", "remote": "https://registry-1.docker.io"}
GHCR = {"prefix": "ghcr.io", "remote": "https://ghcr.io"}


def test_docker_hub_defaults():
    (proxy,) = parse([HUB])
    assert proxy.docker_hub and proxy.scheme == "https" and proxy.host == "registry-1.docker.io"
    assert proxy.tag_ttl_seconds > 0 and proxy.max_bytes == 0


@pytest.mark.parametrize("name,local,upstream", [
    ("docker.io/library/redis", "docker.io/library/redis", "library/redis"),
    ("docker.io/redis", "docker.io/library/redis", "library/redis"),  # as docker reads single names
    ("docker.io/bitnami/redis", "docker.io/bitnami/redis", "bitnami/redis"),
    ("ghcr.io/owner/tool", "ghcr.io/owner/tool", "owner/tool"),
])
def test_namespaced_names(name, local, upstream):
    route = router(HUB, GHCR).route(name)
    assert (route.local_name, route.upstream_name) == (local, upstream)


def test_single_names_stay_single_off_docker_hub():
    assert router(GHCR).route("ghcr.io/tool").upstream_name == "tool"


def test_names_no_proxy_serves_are_private():
    r = router(HUB, GHCR)
    assert r.route("team/app") is None
    assert r.route("docker.io") is None
    assert r.route("docker.iox/redis") is None


def test_containerd_ns_parameter_picks_the_proxy_by_prefix():
    r = router(HUB, GHCR)
    assert r.route("library/redis", "docker.io").local_name == "docker.io/library/redis"
    assert r.route("owner/tool", "ghcr.io").local_name == "ghcr.io/owner/tool"
    assert r.route("team/app", "quay.io") is None  # an unknown namespace: the name as it is
    # A containerd mirror given with a path (override_path) sends both.
    assert r.route("docker.io/library/redis", "docker.io").local_name == "docker.io/library/redis"


def test_longest_prefix_wins_and_globs_fall_through_to_a_shorter_one():
    r = router({"prefix": "", "remote": "http://127.0.0.1:1", "docker_hub": True, "repositories": ["library/*"]},
               {"prefix": "mirror", "remote": "http://127.0.0.1:2", "repositories": ["special/*"]},
               {"prefix": "mirror/special", "remote": "http://127.0.0.1:3"})
    assert r.route("mirror/special/x").proxy.remote == "http://127.0.0.1:3"
    assert r.route("mirror/special/x").upstream_name == "x"
    assert r.route("redis").local_name == "library/redis"  # the root mirror of a Docker Hub
    assert r.route("mirror/other/x") is None  # excluded by mirror's globs, and by the root's
    assert r.route("team/app") is None


@pytest.mark.parametrize("entry,message", [
    ({"prefix": "docker.io"}, "remote is required"),
    ({"prefix": "Docker.IO", "remote": "https://x"}, "is not a repository name"),
    ({"prefix": "localhost:5000", "remote": "https://x"}, "is not a repository name"),
    ({"remote": "ftp://x"}, "remote must be http(s)://host"),
    ({"remote": "https://x/v2/"}, "remote must be http(s)://host"),
    ({"remote": "https://x", "username": "me"}, "username and password must be set together"),
    ({"remote": "https://x", "tag_ttl_seconds": -1}, "must not be negative"),
    ({"remote": "https://x", "max_bytes": "1GB"}, "max_bytes must be a int"),
    ({"remote": "https://x", "repositories": "library/*"}, "repositories must be a list"),
    ({"remote": "https://x", "cache": True}, "unknown option cache"),
])
def test_bad_entries_are_refused_with_a_clear_message(entry, message):
    with pytest.raises(ProxyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse([entry])


def test_two_entries_with_one_prefix_are_refused():
    with pytest.raises(ProxyConfigError, match="two"):
        parse([HUB, dict(HUB)])


def test_the_server_config_reads_proxy_tables(tmp_path):
    path = tmp_path / "kura.toml"
    path.write_text('[[proxy]]\nprefix = "docker.io"\nremote = "https://registry-1.docker.io"\n'
                    'tag_ttl_seconds = 60\nmax_bytes = 1000\n\n[[proxy]]\nprefix = "ghcr.io"\nremote = "https://ghcr.io"\n')
    config = server_config.load(path)
    assert [(p.prefix, p.tag_ttl_seconds, p.max_bytes) for p in config.proxies] == [
        ("docker.io", 60, 1000), ("ghcr.io", 600, 0)]
    path.write_text('[[proxy]]\nprefix = "docker.io"\n')
    with pytest.raises(server_config.ConfigError, match=f"{path}: .*remote is required"):
        server_config.load(path)


def test_the_commented_example_in_config_example_toml_parses():
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN PROXY EXAMPLE\n(.*)# END PROXY EXAMPLE", text, re.S).group(1)
    proxies = parse(tomllib.loads("\n".join(line[2:] for line in block.splitlines()))["proxy"])
    assert [p.prefix for p in proxies] == ["docker.io", "", "ghcr.io"]
    r = Router(proxies)
    assert r.route("redis").local_name == "library/redis"
    assert r.route("docker.io/redis").local_name == "docker.io/library/redis"
    assert r.route("team/app") is None


def test_credentials_in_the_remote_url_are_refused_and_passwords_never_printed():
    with pytest.raises(ProxyConfigError, match="must not carry credentials"):
        parse([{"remote": "https://me:s3cret@registry-1.docker.io"}])
    (proxy,) = parse([{**HUB, "username": "me", "password": "s3cret"}])
    assert "s3cret" not in repr(proxy) and "s3cret" not in repr(Router((proxy,)).route("docker.io/redis"))
