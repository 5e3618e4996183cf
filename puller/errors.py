"""The client's one-line failure and the guard on registry-supplied text, in a module that
imports nothing: `kura` reports errors without loading the HTTP stack."""

from __future__ import annotations


class RegistryError(Exception):
    """A failure to tell the user about in one line."""


def printable(text: str) -> str:
    """Registry-supplied text, without terminal control sequences."""
    return "".join(c if c.isprintable() else "?" for c in text)
