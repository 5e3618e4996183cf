"""Strict JSON for documents that come off the wire (manifests, token claims).

Python's `json.loads` is lenient where a registry must not be: it guesses UTF-16/32 and
skips a UTF-8 byte order mark on bytes, accepts `NaN`/`Infinity`, raises RecursionError on
deep nesting and spends quadratic time on huge integers (then raises a bare ValueError at
4300 digits). Each of those either reads a document differently from other parsers or
turns hostile input into a server error; here every one is a `JSONInvalid`.
"""

from __future__ import annotations

import json

# Manifests nest about five levels deep; far below the interpreter's recursion limit, so
# the same document is accepted or refused whatever the caller's stack depth.
MAX_DEPTH = 64
# Sizes are int64 in every registry; no field of a manifest or token needs more digits.
MAX_INTEGER_DIGITS = 20

_BOM = b"\xef\xbb\xbf"


class JSONInvalid(ValueError):
    """The bytes are not strict JSON of bounded shape."""


def loads(data: bytes | str) -> object:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        if data.startswith(_BOM):
            raise JSONInvalid("a byte order mark is not allowed before JSON")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInvalid(f"JSON must be UTF-8: {exc}") from None
    else:
        text = data
        if text.startswith("\ufeff"):
            raise JSONInvalid("a byte order mark is not allowed before JSON")
    try:
        value = json.loads(text, parse_int=_integer, parse_constant=_constant)
    except RecursionError:
        raise JSONInvalid(f"JSON is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError and the hooks' own errors
        raise JSONInvalid(str(exc)) from None
    _check_depth(value)
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise JSONInvalid(f"integer of {len(text.lstrip('-'))} digits is too long (limit {MAX_INTEGER_DIGITS})")
    return int(text)


def _constant(text: str) -> float:
    raise JSONInvalid(f"{text} is not JSON")


def _check_depth(value: object) -> None:
    pending = [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        current, depth = pending.pop()
        children = current.values() if isinstance(current, dict) else current
        if depth > MAX_DEPTH:
            raise JSONInvalid(f"JSON is nested more than {MAX_DEPTH} levels deep")
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
