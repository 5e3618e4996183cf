"""Server configuration: defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from storage.usage import Quota
from storage.gc import GcSettings, RetentionRule

from .auth.config import AuthConfig
from .auth.config import ConfigError as AuthConfigError
from .auth.config import parse as parse_auth
from .auth.rules import glob_to_regex
from .logformat import FORMATS as LOG_FORMATS
from .notify.config import Endpoint, NotifyConfigError
from .notify.config import parse as parse_notifications
from .proxy.config import Proxy, ProxyConfigError
from .proxy.config import parse as parse_proxies

MIB = 1 << 20
MAX_MANIFEST_LIMIT = 64 * MIB  # storage.manifests.READ_LIMIT: what can be pushed can be read back


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class S3Settings:
    """[storage.s3]: where the S3 driver keeps the store (storage/s3.py)."""
    bucket: str
    endpoint: str | None = None  # None: AWS itself, for `region`
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str | None = None  # None: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    secret_key: str | None = field(default=None, repr=False)
    redirect: bool = False  # answer blob GETs with a presigned URL of the object store
    redirect_seconds: int = 600


_S3_KEYS: dict[str, type] = {"bucket": str, "endpoint": str, "region": str, "prefix": str, "access_key": str,
                             "secret_key": str, "redirect": bool, "redirect_seconds": int}
STORAGE_DRIVERS = ("filesystem", "s3")


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:5000"
    root: Path = Path("./data")
    storage_driver: str = "filesystem"
    s3: S3Settings | None = None
    delete_enabled: bool = True
    upload_expiry_seconds: int = 24 * 3600
    upload_purge_interval_seconds: int = 3600
    chunk_min_length: int = 1 << 20
    max_manifest_bytes: int = 4 * MIB
    max_blob_bytes: int = 0  # 0: no limit
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 1000
    max_connections_per_client: int = 100  # 0: no per-client cap
    header_timeout_seconds: int = 30
    body_timeout_seconds: int = 60
    idle_timeout_seconds: int = 60
    shutdown_timeout_seconds: int = 60
    workers: int = 0  # 0: one per CPU core (registry/supervisor.py)
    max_header_bytes: int = 64 * 1024
    max_unauthenticated_body_bytes: int = 16 * 1024
    max_upload_sessions_per_user: int = 100  # 0: no limit
    max_upload_sessions_per_repository: int = 500  # 0: no limit
    log_level: str = "info"
    access_log: bool = True
    log_format: str = "text"  # or "json": one object a line (registry/logformat.py)
    gc_interval_seconds: int = 86400  # 0: no periodic collection
    gc_grace_seconds: int = 3600
    gc_delete_untagged: bool = False
    gc_retention: tuple[RetentionRule, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    notifications: tuple[Endpoint, ...] = ()
    quotas: tuple[Quota, ...] = ()
    proxies: tuple[Proxy, ...] = ()
    ui_enabled: bool = True  # the web UI at /ui/ (registry/ui/)
    metrics_enabled: bool = True
    metrics_token: str | None = field(default=None, repr=False)  # None: /metrics needs no auth
    metrics_usage_refresh_seconds: int = 60

    def gc_settings(self) -> GcSettings:
        return GcSettings(grace_seconds=self.gc_grace_seconds, delete_untagged=self.gc_delete_untagged,
                          retention=self.gc_retention, upload_expiry_seconds=self.upload_expiry_seconds)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


# TOML section/key -> Config field, with the type the value must have.
_KEYS: dict[tuple[str, str], tuple[str, type]] = {
    ("server", "listen"): ("listen", str),
    ("server", "tls_cert"): ("tls_cert", str),
    ("server", "tls_key"): ("tls_key", str),
    ("server", "max_connections"): ("max_connections", int),
    ("server", "max_connections_per_client"): ("max_connections_per_client", int),
    ("server", "header_timeout_seconds"): ("header_timeout_seconds", int),
    ("server", "body_timeout_seconds"): ("body_timeout_seconds", int),
    ("server", "idle_timeout_seconds"): ("idle_timeout_seconds", int),
    ("server", "shutdown_timeout_seconds"): ("shutdown_timeout_seconds", int),
    ("server", "workers"): ("workers", int),
    ("storage", "root"): ("root", str),
    ("storage", "driver"): ("storage_driver", str),
    ("storage", "delete_enabled"): ("delete_enabled", bool),
    ("uploads", "expiry_seconds"): ("upload_expiry_seconds", int),
    ("uploads", "purge_interval_seconds"): ("upload_purge_interval_seconds", int),
    ("uploads", "chunk_min_length"): ("chunk_min_length", int),
    ("uploads", "max_sessions_per_user"): ("max_upload_sessions_per_user", int),
    ("uploads", "max_sessions_per_repository"): ("max_upload_sessions_per_repository", int),
    ("limits", "max_manifest_bytes"): ("max_manifest_bytes", int),
    ("limits", "max_blob_bytes"): ("max_blob_bytes", int),
    ("limits", "max_header_bytes"): ("max_header_bytes", int),
    ("limits", "max_unauthenticated_body_bytes"): ("max_unauthenticated_body_bytes", int),
    ("log", "level"): ("log_level", str),
    ("log", "access_log"): ("access_log", bool),
    ("log", "format"): ("log_format", str),
    ("gc", "interval_seconds"): ("gc_interval_seconds", int),
    ("gc", "grace_seconds"): ("gc_grace_seconds", int),
    ("gc", "delete_untagged"): ("gc_delete_untagged", bool),
    ("ui", "enabled"): ("ui_enabled", bool),
    ("metrics", "enabled"): ("metrics_enabled", bool),
    ("metrics", "token"): ("metrics_token", str),
    ("metrics", "usage_refresh_seconds"): ("metrics_usage_refresh_seconds", int),
}
# [[gc.retention]] entries: key -> the types its value may have.
_RETENTION_KEYS: dict[str, tuple[type, ...]] = {
    "repositories": (list,), "keep_last": (int,), "keep_tags": (str,), "older_than_days": (int, float),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def load(path: Path | None = None, **overrides) -> Config:
    """Defaults, then the TOML file at `path`, then non-None `overrides` (command-line flags)."""
    values: dict = {}
    auth_section: dict = {}
    quota_section: object = []
    proxy_section: object = []
    notification_section: object = []
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for section, table in document.items():
            if section == "auth":
                auth_section = table
                continue
            if section == "quota":
                quota_section = table
                continue
            if section == "proxy":
                proxy_section = table
                continue
            if section == "notifications":
                notification_section = table
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in table.items():
                if (section, key) == ("gc", "retention"):
                    values["gc_retention"] = _retention_rules(value, path)
                    continue
                if (section, key) == ("storage", "s3"):
                    values["s3"] = _s3_settings(value, path)
                    continue
                if (section, key) not in _KEYS:
                    raise ConfigError(f"{path}: unknown option {section}.{key}")
                name, kind = _KEYS[(section, key)]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise ConfigError(f"{path}: {section}.{key} must be a {kind.__name__}")
                values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    if values.get("metrics_token") == "":
        values["metrics_token"] = None  # as shown in config.example.toml: no token
    for name in ("root", "tls_cert", "tls_key"):
        if values.get(name):
            values[name] = Path(values[name])
        elif name in values:
            values[name] = None if name != "root" else Config.root
    try:
        values["auth"] = parse_auth(auth_section)
    except AuthConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    try:
        values["quotas"] = parse_quotas(quota_section)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    try:
        values["proxies"] = parse_proxies(proxy_section)
    except ProxyConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    try:
        values["notifications"] = parse_notifications(notification_section)
    except NotifyConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    config = replace(Config(), **values)
    _validate(config)
    return config


def make_quota(repositories, max_bytes: int) -> Quota:
    """A quota on the repositories matching `repositories` (globs, as in [[auth.rules]])."""
    globs = tuple(repositories)
    return Quota(globs, max_bytes, tuple(glob_to_regex(glob) for glob in globs))


def parse_quotas(entries: object) -> tuple[Quota, ...]:
    """The `[[quota]]` entries: `repositories` (globs) and `max_bytes`."""
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError("quota must be an array of tables: [[quota]]")
    quotas = []
    for number, entry in enumerate(entries, 1):
        where = f"quota #{number}"
        unknown = set(entry) - {"repositories", "max_bytes"}
        if unknown:
            raise ConfigError(f"{where}: unknown option {sorted(unknown)[0]}")
        globs = entry.get("repositories")
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(f"{where}: repositories must be a non-empty list of globs")
        limit = entry.get("max_bytes")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ConfigError(f"{where}: max_bytes must be a positive integer")
        quotas.append(make_quota(globs, limit))
    return tuple(quotas)


def _s3_settings(value: object, path: Path | None) -> S3Settings:
    where = f"{path}: [storage.s3]"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    for key, item in value.items():
        kind = _S3_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: unknown option {key}")
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise ConfigError(f"{where}: {key} must be a {kind.__name__}")
    if not value.get("bucket"):
        raise ConfigError(f"{where}: bucket is required")
    if bool(value.get("access_key")) != bool(value.get("secret_key")):
        raise ConfigError(f"{where}: access_key and secret_key must be set together")
    endpoint = value.get("endpoint")
    if endpoint is not None and not re.fullmatch(r"https?://[^/\s]+/?", endpoint):
        raise ConfigError(f"{where}: endpoint must be http(s)://HOST[:PORT], got {endpoint!r}")
    if value.get("redirect_seconds", 600) <= 0:
        raise ConfigError(f"{where}: redirect_seconds must be positive")
    return S3Settings(**value)


def _retention_rules(value: object, path: Path | None) -> tuple[RetentionRule, ...]:
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ConfigError(f"{path}: gc.retention must be [[gc.retention]] tables")
    rules = []
    for number, entry in enumerate(value, 1):
        where = f"{path}: [[gc.retention]] #{number}"
        for key, item in entry.items():
            kinds = _RETENTION_KEYS.get(key)
            if kinds is None:
                raise ConfigError(f"{where}: unknown option {key}")
            if not isinstance(item, kinds) or isinstance(item, bool):
                raise ConfigError(f"{where}: {key} must be a {' or '.join(k.__name__ for k in kinds)}")
        patterns = entry.get("repositories")
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{where}: repositories must be a non-empty list of globs")
        if entry.get("keep_last", 0) < 0 or entry.get("older_than_days", 0) < 0:
            raise ConfigError(f"{where}: keep_last and older_than_days must not be negative")
        try:
            rules.append(RetentionRule(tuple(patterns), entry.get("keep_last"), entry.get("keep_tags"),
                                       entry.get("older_than_days")))
        except re.error as exc:
            raise ConfigError(f"{where}: keep_tags is not a regular expression: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(rules)


def _validate(config: Config) -> None:
    split_listen(config.listen)
    if config.storage_driver not in STORAGE_DRIVERS:
        raise ConfigError(f"storage.driver must be one of {', '.join(STORAGE_DRIVERS)}, got {config.storage_driver!r}")
    if config.storage_driver == "s3" and config.s3 is None:
        raise ConfigError("storage.driver = \"s3\" needs a [storage.s3] table (bucket, endpoint, ...)")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(LOG_LEVELS)}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log.format must be one of {', '.join(LOG_FORMATS)}, got {config.log_format!r}")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key must be set together")
    if not 4 * MIB <= config.max_manifest_bytes <= MAX_MANIFEST_LIMIT:
        raise ConfigError("limits.max_manifest_bytes must be between 4 MiB (the spec's minimum) "
                          f"and {MAX_MANIFEST_LIMIT >> 20} MiB")
    for name in ("upload_expiry_seconds", "upload_purge_interval_seconds", "max_connections",
                 "header_timeout_seconds", "body_timeout_seconds", "idle_timeout_seconds",
                 "shutdown_timeout_seconds", "metrics_usage_refresh_seconds"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    for name in ("chunk_min_length", "max_blob_bytes", "max_connections_per_client",
                 "max_upload_sessions_per_user", "max_upload_sessions_per_repository",
                 "gc_interval_seconds", "gc_grace_seconds"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative")
    if config.workers < 0:
        raise ConfigError("server.workers (--workers) must not be negative (0: one per CPU core)")
    if config.max_header_bytes < 8 * 1024:
        raise ConfigError("limits.max_header_bytes must be at least 8 KiB")
    if config.max_unauthenticated_body_bytes < 1024:
        raise ConfigError("limits.max_unauthenticated_body_bytes must be at least 1 KiB")
    token = config.metrics_token
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token):
        raise ConfigError("metrics.token must be at least 16 printable ASCII characters without spaces "
                          "(it is sent as `Authorization: Bearer <token>`)")
