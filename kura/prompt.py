"""Questions at the terminal (username, password, "delete it?") that end cleanly: Ctrl-C ends
the prompt's line and leaves quietly, Ctrl-D (end of input) is a one-line refusal."""

from __future__ import annotations

import getpass
import sys


class Interrupted(Exception):
    """Ctrl-C at a prompt: the command exits 130 and says nothing more."""


class NoAnswer(ValueError):
    """End of input at a prompt."""


def _end_line() -> None:
    """The prompt's line was left open (no Enter was typed): close it, on the terminal."""
    for stream in (sys.stderr, sys.stdout):
        if stream.isatty():
            stream.write("\n")
            stream.flush()
            return


def ask(question: str, what: str, secret: bool = False) -> str:
    """A line typed at the terminal (not echoed when `secret`), without its newline."""
    try:
        return getpass.getpass(question) if secret else input(question)
    except KeyboardInterrupt:
        _end_line()
        raise Interrupted() from None
    except EOFError:
        _end_line()
        raise NoAnswer(f"no {what} given (end of input)") from None


def confirm(question: str) -> bool:
    """Yes only when the user types y or yes; the question goes to stderr, away from output."""
    sys.stderr.write(question)
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        _end_line()
        raise Interrupted() from None
    if not answer:
        _end_line()
    return answer.strip().lower() in ("y", "yes")
