"""How `kura serve` writes its log ([log] format): one line a record, as text or as one JSON
object, and never with a password, a token or a credential in it."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The id of the request a record is logged in (set by registry/access_log.request_context):
# a JSON line names it, so a warning can be matched to its request line.
CURRENT_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("kura_request_id", default=None)

# Keys whose values are secret, as a query string, a form, JSON or a repr writes them (a
# presigned URL's X-Amz-Signature, X-Amz-Credential and X-Amz-Security-Token among them).
_SECRET_KEYS = (r"password|passwd|secret|secret_key|secret_access_key|client_secret|token|access_token|"
                r"refresh_token|signature|credential")
_SECRET = re.compile(
    r"(?i)(\b(?:basic|bearer)\s+)[A-Za-z0-9._~+/-]{6,}=*"  # an Authorization header's credentials
    rf"|(\b(?:{_SECRET_KEYS})=)[^\s&\"';,]+"  # password=... in a query string or form body
    rf"|(['\"](?:{_SECRET_KEYS})['\"]\s*:\s*['\"]?)[^\s'\",}}]+"  # "password": "..." in JSON or a repr
    r"|()\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # a JWT anywhere
REDACTED = "[redacted]"


def _keep_key(match: re.Match) -> str:
    return next(group for group in match.groups() if group is not None) + REDACTED


# Words one of which every match of _SECRET contains (lower case): most lines have none, and
# looking for them costs a fraction of the expression's search.
_TRIGGERS = ("basic", "bearer", "passw", "secret", "token", "signature", "credential", "eyj")


def scrub(text: str) -> str:
    """`text` with credentials, tokens and passwords replaced by [redacted]."""
    lowered = text.lower()
    for word in _TRIGGERS:
        if word in lowered:
            return _SECRET.sub(_keep_key, text)
    return text


class RequestLine:
    """A request's log record (registry/access_log.py): its `fields`, written out only when a
    handler formats it, as the text line or as JSON keys."""

    __slots__ = ("fields", "version")

    def __init__(self, fields: dict, version: str):
        self.fields = fields
        self.version = version

    def summary(self) -> str:
        f = self.fields
        return f"{f['method']} {f['path']} {f['status']}"

    def __str__(self) -> str:
        f = self.fields
        path = f["path"].replace('"', "%22")  # the line's quotes must stay the request's
        return (f'{f["client"]} "{f["method"]} {path} HTTP/{self.version}" {f["status"]} {f["bytes_sent"]} '
                f'{f["bytes_received"]} {f["duration_ms"]:.1f}ms id={f["request_id"]} user={_word(f["user"])} '
                f'repo={_word(f["repository"])} digest={_word(f["digest"])} ua={_word(f["user_agent"])}')


def _word(value: str | None) -> str:
    """A field of the text line: `-` when absent, quoted when it has spaces or quotes."""
    if value is None or value == "":
        return "-"
    if value.isprintable() and " " not in value and '"' not in value:
        return value
    return json.dumps(value)


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05,678 INFO kura.server: message` (a worker's: `worker 2 (pid 123) INFO`)."""

    def __init__(self, worker: int | None = None):
        fmt = TEXT_FORMAT if worker is None else \
            TEXT_FORMAT.replace("%(levelname)s", f"worker {worker} (pid %(process)d) %(levelname)s", 1)
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, worker and pid (when workers run),
    request_id (a record logged while a request is answered), and a request line's fields."""

    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {"ts": _timestamp(record.created), "level": record.levelname.lower(), "logger": record.name}
        if self.worker is not None:
            entry["worker"] = self.worker
            entry["pid"] = record.process
        if isinstance(record.msg, RequestLine):
            entry["message"] = record.msg.summary()
            entry.update(record.msg.fields)
        else:
            entry["message"] = scrub(record.getMessage())
            request = CURRENT_REQUEST.get()
            if request is not None:
                entry["request_id"] = request
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = scrub(record.exc_text)
        if record.stack_info:
            entry["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)  # ASCII: whatever the encoding of stderr


def configure(level: str, form: str, worker: int | None = None) -> None:
    """Log records of `level` and above to stderr in `form` ("text" or "json"); a worker's
    lines name it. Called again (a worker, a reload), it changes the format in place."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonFormatter(worker) if form == "json" else TextFormatter(worker)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level.upper())
