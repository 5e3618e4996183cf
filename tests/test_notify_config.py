"""`[[notifications]]` in the config file: defaults, and bad values refused with a clear message."""

import pytest

from registry.config import ConfigError, load
from registry.notify.config import ACTIONS


def config_with(tmp_path, text: str):
    path = tmp_path / "kura.toml"
    path.write_text(text)
    return load(path)


def test_only_url_is_required_and_the_rest_has_defaults(tmp_path):
    (endpoint,) = config_with(tmp_path, '[[notifications]]\nurl = "http://127.0.0.1:9000/hook"\n').notifications
    assert endpoint.events == frozenset(ACTIONS) and endpoint.repositories == () and endpoint.headers == ()
    assert (endpoint.timeout_seconds, endpoint.backoff_seconds, endpoint.max_backoff_seconds,
            endpoint.max_age_seconds) == (5, 1, 300, 7 * 86400)
    assert endpoint.name.startswith("127.0.0.1_9000-") and endpoint.wants("pull", "any/repo")
    assert load().notifications == ()


def test_every_option(tmp_path):
    (endpoint,) = config_with(tmp_path, """
[[notifications]]
url = "https://hooks.example/registry"
name = "audit"
headers = { Authorization = "Bearer t0ken", X-Env = ["prod", "eu"] }
events = ["push", "delete"]
repositories = ["team/**", "solo"]
timeout_seconds = 2.5
backoff_seconds = 0.5
max_backoff_seconds = 60
max_age_seconds = 3600
""").notifications
    assert endpoint.name == "audit"
    assert endpoint.headers == (("Authorization", "Bearer t0ken"), ("X-Env", "prod"), ("X-Env", "eu"))
    assert "t0ken" not in repr(endpoint)
    assert endpoint.wants("push", "team/a/b") and endpoint.wants("delete", "solo")
    assert not endpoint.wants("pull", "team/a") and not endpoint.wants("push", "solo/x")
    assert (endpoint.timeout_seconds, endpoint.max_age_seconds) == (2.5, 3600)


def test_names_from_urls_differ_per_url(tmp_path):
    endpoints = config_with(tmp_path, '[[notifications]]\nurl = "http://h:1/a"\n'
                                      '[[notifications]]\nurl = "http://h:1/b"\n').notifications
    assert endpoints[0].name != endpoints[1].name


@pytest.mark.parametrize("entry, message", [
    ('name = "x"', "notifications #1: url is required"),
    ('url = "ftp://h/x"', "url must be http:// or https:// with a host"),
    ('url = "http:///path"', "with a host"),
    ('url = "http://h:99999/"', "is not a URL"),
    ('url = "http://user:pw@h/"', "must not carry credentials"),
    ('url = "http://h/"\nevents = ["push", "tag"]', "events must be a non-empty list of push, pull, delete, mount"),
    ('url = "http://h/"\nevents = []', "events must be a non-empty list"),
    ('url = "http://h/"\nrepositories = "team/*"', "repositories must be a list of globs"),
    ('url = "http://h/"\nheaders = "X: y"', "headers must be a table"),
    ('url = "http://h/"\nheaders = { X-Num = 5 }', "headers.X-Num must be a string or a list of strings"),
    ('url = "http://h/"\nheaders = { "Bad Name" = "v" }', "'Bad Name' is not a header name"),
    ('url = "http://h/"\nheaders = { X = "a\\r\\nInjected: 1" }', "(one line each)"),
    ('url = "http://h/"\ntimeout_seconds = 0', "timeout_seconds must be a positive number"),
    ('url = "http://h/"\nbackoff_seconds = -1', "backoff_seconds must be a positive number"),
    ('url = "http://h/"\nmax_age_seconds = "7d"', "max_age_seconds must be a positive number"),
    ('url = "http://h/"\nbackoff_seconds = 10\nmax_backoff_seconds = 5', "must not be below backoff_seconds"),
    ('url = "http://h/"\nname = "../x"', "name must be letters, digits"),
    ('url = "http://h/"\nretries = 3', "notifications #1: unknown option retries"),
])
def test_bad_values_are_refused(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=r"kura\.toml: ") as caught:
        config_with(tmp_path, f"[[notifications]]\n{entry}\n")
    assert message in str(caught.value)


def test_two_endpoints_may_not_share_a_name(tmp_path):
    with pytest.raises(ConfigError, match="notifications #2: name 'x' is taken by notifications #1"):
        config_with(tmp_path, '[[notifications]]\nurl = "http://a/"\nname = "x"\n'
                              '[[notifications]]\nurl = "http://b/"\nname = "x"\n')
    with pytest.raises(ConfigError, match="is taken"):  # the same URL twice needs names
        config_with(tmp_path, '[[notifications]]\nurl = "http://a/"\n[[notifications]]\nurl = "http://a/"\n')


def test_notifications_must_be_an_array_of_tables(tmp_path):
    with pytest.raises(ConfigError, match=r"array of tables: \[\[notifications\]\]"):
        config_with(tmp_path, '[notifications]\nurl = "http://a/"\n')


def test_the_commented_example_in_config_example_toml_parses(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN NOTIFICATIONS EXAMPLE\n(.*)# END NOTIFICATIONS EXAMPLE", text, re.S).group(1)
    (endpoint,) = config_with(tmp_path, "\n".join(line[2:] for line in block.splitlines())).notifications
    assert endpoint.url == "https://hooks.example/registry" and endpoint.events == {"push", "delete"}
