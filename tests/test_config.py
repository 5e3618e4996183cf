"""Configuration precedence and validation."""

import re
from pathlib import Path

import pytest

from registry.config import ConfigError, load


def test_defaults():
    c = load()
    assert (c.listen, c.root, c.delete_enabled, c.max_manifest_bytes) == ("127.0.0.1:5000", Path("./data"), True, 4 << 20)
    assert (c.host, c.port) == ("127.0.0.1", 5000)


def test_file_then_flags(tmp_path):
    f = tmp_path / "kura.toml"
    f.write_text('[server]\nlisten = "127.0.0.1:6000"\n[storage]\nroot = "/srv/kura"\ndelete_enabled = false\n'
                 '[log]\nlevel = "debug"\naccess_log = false\nformat = "json"\n')
    c = load(f)
    assert (c.listen, c.root, c.delete_enabled, c.log_level, c.access_log, c.log_format) == (
        "127.0.0.1:6000", Path("/srv/kura"), False, "debug", False, "json")
    c = load(f, listen="0.0.0.0:7000", root=None)
    assert c.listen == "0.0.0.0:7000" and c.root == Path("/srv/kura")


def test_example_config_is_complete_and_loads():
    import tomllib

    from registry.config import _KEYS
    example = Path(__file__).parents[1] / "config.example.toml"
    assert load(example) == load()  # every value shown is the default
    document = tomllib.loads(example.read_text())
    shown = {(section, key) for section, table in document.items() if section in {s for s, _ in _KEYS}
             for key in table}
    assert shown == set(_KEYS)  # and every option is shown


@pytest.mark.parametrize("text, message", [
    ('[server]\nlisten = "nope"\n', "HOST:PORT"),
    ('[server]\nlistne = "x"\n', "unknown option server.listne"),
    ('[storage]\ndelete_enabled = "yes"\n', "must be a bool"),
    ('[limits]\nmax_manifest_bytes = 1000\n', "between 4 MiB"),
    ('[limits]\nmax_manifest_bytes = 100000000\n', "and 64 MiB"),
    ('[server]\ntls_cert = "/x.pem"\n', "together"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('[log]\nformat = "xml"\n', "log.format must be one of text, json"),
    ('[uploads]\nexpiry_seconds = 0\n', "positive"),
    ('[server]\nbody_timeout_seconds = 0\n', "positive"),
    ('[server]\nmax_connections_per_client = -1\n', "must not be negative"),
    ('[server]\nworkers = -1\n', r"server.workers \(--workers\) must not be negative"),
    ('[server]\nshutdown_timeout_seconds = 0\n', "positive"),
    ('[uploads]\nmax_sessions_per_user = -1\n', "must not be negative"),
    ('[limits]\nmax_header_bytes = 100\n', "at least 8 KiB"),
    ('[limits]\nmax_unauthenticated_body_bytes = 10\n', "at least 1 KiB"),
    ('[gc]\ninterval_seconds = -1\n', "must not be negative"),
    ('[ui]\nenabled = "no"\n', "ui.enabled must be a bool"),
    ('[ui]\nport = 8080\n', "unknown option ui.port"),
    ('[gc]\ngrace_seconds = "1h"\n', "must be a int"),
    ('[gc]\nretention = 5\n', r"\[\[gc.retention\]\] tables"),
    ('[[gc.retention]]\nrepositories = ["a"]\nkeep_tags = "v.*"\n', "needs keep_last or older_than_days"),
    ('[[gc.retention]]\nrepositories = []\nkeep_last = 1\n', "non-empty list of globs"),
    ('[[gc.retention]]\nkeep_last = 1\n', "non-empty list of globs"),
    ('[[gc.retention]]\nrepositories = ["a"]\nkeep_last = -1\n', "must not be negative"),
    ('[[gc.retention]]\nrepositories = ["a"]\nkeep_last = true\n', "keep_last must be a int"),
    ('[[gc.retention]]\nrepositories = ["a"]\nkeep_last = 1\nkeep_tags = "("\n', "not a regular expression"),
    ('[[gc.retention]]\nrepositories = ["a"]\nkeep_last = 1\nkeep = 2\n', "#1: unknown option keep"),
    ('[metrics]\nenabled = "no"\n', "metrics.enabled must be a bool"),
    ('[metrics]\ntoken = "short"\n', "metrics.token must be at least 16"),
    ('[metrics]\ntoken = "a token with spaces"\n', "without spaces"),
    ('[metrics]\nusage_refresh_seconds = 0\n', "metrics_usage_refresh_seconds must be positive"),
    ('[metrics]\npath = "/m"\n', "unknown option metrics.path"),
    ("not toml [", "kura.toml"),
])
def test_invalid_files(tmp_path, text, message):
    f = tmp_path / "kura.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(f)


def test_ui_section(tmp_path):
    f = tmp_path / "kura.toml"
    f.write_text("[ui]\nenabled = false\n")
    assert load().ui_enabled and not load(f).ui_enabled


def test_metrics_section(tmp_path):
    f = tmp_path / "kura.toml"
    f.write_text('[metrics]\nenabled = false\ntoken = "0123456789abcdef-token"\nusage_refresh_seconds = 300\n')
    c = load(f)
    assert (c.metrics_enabled, c.metrics_token, c.metrics_usage_refresh_seconds) == (
        False, "0123456789abcdef-token", 300)
    assert "0123456789abcdef" not in repr(c)
    assert (load().metrics_enabled, load().metrics_token) == (True, None)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_example_auth_section_parses():
    """The commented worked example in config.example.toml is valid and means what it says."""
    import re
    import tomllib

    from registry.auth.config import parse
    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN AUTH EXAMPLE\n(.*)# END AUTH EXAMPLE", text, re.S).group(1)
    example = tomllib.loads("\n".join(line[2:] for line in block.splitlines()))
    external = example["auth"].pop("external")
    assert set(external) == {"realm", "service", "issuer", "certificate", "jwks"}
    auth = parse({"mode": "token", **example["auth"]})
    rules = auth.rules
    assert rules.allowed("bob", "repository", "team/app", {"pull", "push", "delete"}) == {"pull", "push"}
    assert rules.allowed("alice", "repository", "team/app", {"delete"}) == {"delete"}
    assert rules.allowed(None, "repository", "public/x", {"pull", "push"}) == {"pull"}
    assert rules.allowed("bob", "registry", "catalog", {"*"}) == {"*"}


def test_connection_cap_fits_the_open_file_limit():
    from registry.serve import connection_limits
    config = load()
    assert connection_limits(config, 1 << 20).max_connections == config.max_connections
    assert connection_limits(config, 1024).max_connections == (1024 - 64) // 2  # two descriptors each


def test_quotas(tmp_path):
    f = tmp_path / "kura.toml"
    f.write_text('[[quota]]\nrepositories = ["team/**", "solo"]\nmax_bytes = 1000\n'
                 '[[quota]]\nrepositories = ["library/*"]\nmax_bytes = 5\n')
    team, library = load(f).quotas
    assert (team.repositories, team.max_bytes, library.max_bytes) == (("team/**", "solo"), 1000, 5)
    assert team.matches("team/a/b") and team.matches("solo") and not team.matches("teamx")
    assert library.matches("library/redis") and not library.matches("library/a/b")
    assert load().quotas == ()


@pytest.mark.parametrize("text, message", [
    ('[quota]\nmax_bytes = 1\n', r"array of tables: \[\[quota\]\]"),
    ('[[quota]]\nmax_bytes = 1\n', "quota #1: repositories must be a non-empty list"),
    ('[[quota]]\nrepositories = []\nmax_bytes = 1\n', "non-empty list of globs"),
    ('[[quota]]\nrepositories = "a"\nmax_bytes = 1\n', "non-empty list of globs"),
    ('[[quota]]\nrepositories = ["a"]\n', "quota #1: max_bytes must be a positive integer"),
    ('[[quota]]\nrepositories = ["a"]\nmax_bytes = 0\n', "positive integer"),
    ('[[quota]]\nrepositories = ["a"]\nmax_bytes = "1 GB"\n', "positive integer"),
    ('[[quota]]\nrepositories = ["a"]\nmax_bytes = 1\n[[quota]]\nrepositories = ["b"]\nmax_byte = 1\n',
     "quota #2: unknown option max_byte"),
])
def test_invalid_quotas(tmp_path, text, message):
    f = tmp_path / "kura.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(f)


def test_example_quota_section_parses():
    """The commented quota example in config.example.toml is valid and means what it says."""
    import re
    import tomllib

    from registry.config import parse_quotas
    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN QUOTA EXAMPLE\n(.*)# END QUOTA EXAMPLE", text, re.S).group(1)
    example = tomllib.loads("\n".join(line[2:] for line in block.splitlines()))
    quotas = parse_quotas(example["quota"])
    assert [q.max_bytes for q in quotas if q.matches("team/app")] == [50 * 1024**3]


def test_gc_section(tmp_path):
    from storage.gc import RetentionRule
    f = tmp_path / "kura.toml"
    f.write_text('[gc]\ninterval_seconds = 0\ngrace_seconds = 60\ndelete_untagged = true\n'
                 '[[gc.retention]]\nrepositories = ["ci/**"]\nkeep_last = 3\nkeep_tags = "v.*"\n'
                 '[[gc.retention]]\nrepositories = ["a", "b/*"]\nolder_than_days = 1.5\n')
    settings = load(f).gc_settings()
    assert (settings.grace_seconds, settings.delete_untagged) == (60, True)
    assert settings.retention == (RetentionRule(("ci/**",), keep_last=3, keep_tags="v.*"),
                                  RetentionRule(("a", "b/*"), older_than_days=1.5))
    assert load(f).gc_interval_seconds == 0
    defaults = load().gc_settings()
    assert (load().gc_interval_seconds, defaults.grace_seconds, defaults.delete_untagged, defaults.retention) == (
        86400, 3600, False, ())


def test_example_retention_rules_parse():
    """The commented retention example in config.example.toml is valid and means what it says."""
    import re
    import tomllib

    from registry.config import _retention_rules
    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN GC EXAMPLE\n(.*)# END GC EXAMPLE", text, re.S).group(1)
    rules = _retention_rules(tomllib.loads("\n".join(line[2:] for line in block.splitlines()))["gc"]["retention"],
                             None)
    ci, nightly = rules
    assert ci.applies_to("ci/app/x") and not ci.applies_to("nightly/x")
    assert ci._keep.fullmatch("v1.2.3") and not ci._keep.fullmatch("latest")
    assert nightly.applies_to("nightly/x") and not nightly.applies_to("nightly/x/y")


def test_s3_storage_section(tmp_path):
    f = tmp_path / "kura.toml"
    f.write_text('[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = "http://127.0.0.1:8333"\nbucket = "b"\n'
                 'access_key = "AK"\nsecret_key = "SK-secret"\nredirect = true\n')
    c = load(f)
    assert c.storage_driver == "s3" and (c.s3.endpoint, c.s3.bucket, c.s3.region, c.s3.redirect) == (
        "http://127.0.0.1:8333", "b", "us-east-1", True)
    assert "SK-secret" not in repr(c)


def test_the_commented_s3_example_in_config_example_toml_parses(tmp_path):
    text = (Path(__file__).parents[1] / "config.example.toml").read_text()
    block = re.search(r"# BEGIN S3 EXAMPLE\n(.*)# END S3 EXAMPLE", text, re.S).group(1)
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.splitlines()]
    f = tmp_path / "kura.toml"
    f.write_text('[storage]\ndriver = "s3"\n' + "\n".join(lines) + "\n")
    c = load(f)
    assert (c.s3.bucket, c.s3.endpoint, c.s3.redirect_seconds) == ("kura", "http://127.0.0.1:8333", 600)


@pytest.mark.parametrize("text, message", [
    ('[storage]\ndriver = "nfs"\n', "storage.driver must be one of filesystem, s3"),
    ('[storage]\ndriver = "s3"\n', "needs a [storage.s3] table"),
    ('[storage.s3]\nendpoint = "http://x:1"\n', "bucket is required"),
    ('[storage.s3]\nbucket = "b"\naccess_key = "a"\n', "access_key and secret_key must be set together"),
    ('[storage.s3]\nbucket = "b"\nendpoint = "127.0.0.1:8333"\n', "endpoint must be http(s)://HOST[:PORT]"),
    ('[storage.s3]\nbucket = "b"\nsecrets = "x"\n', "unknown option secrets"),
    ('[storage.s3]\nbucket = 3\n', "bucket must be a str"),
])
def test_bad_s3_settings_are_refused(tmp_path, text, message):
    f = tmp_path / "kura.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(f)


def test_workers_from_the_file_then_the_flag(tmp_path):
    import os

    from registry.supervisor import worker_count

    f = tmp_path / "kura.toml"
    f.write_text("[server]\nworkers = 3\n")
    assert load(f, workers=None).workers == 3 and worker_count(load(f)) == 3
    assert load(f, workers=1).workers == 1
    assert load().workers == 0 and worker_count(load()) == len(os.sched_getaffinity(0))
