"""Download progress: bars on a terminal, plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time

from .errors import printable


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    def start(self, name: str, total: int) -> None: ...
    def advance(self, name: str, amount: int) -> None: ...
    def done(self, name: str, note: str) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Quiet(Progress):
    pass


class Lines(Progress):
    """One line per finished blob: logs and pipes."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream

    def done(self, name: str, note: str) -> None:
        print(f"{name[:19]}: {note}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(printable(text), file=self.stream, flush=True)


class Bars(Progress):
    """One bar per blob plus a total, redrawn in place at most ten times a second."""

    WIDTH = 30

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.items: dict[str, list] = {}  # name -> [done bytes, total, note]
        self.drawn = 0
        self.last = 0.0

    def start(self, name: str, total: int) -> None:
        self.items[name] = [0, total, ""]
        self._draw(force=True)

    def advance(self, name: str, amount: int) -> None:
        self.items[name][0] += amount
        self._draw()

    def done(self, name: str, note: str) -> None:
        item = self.items.setdefault(name, [0, 0, ""])
        item[0], item[2] = item[1], note
        self._draw(force=True)

    def message(self, text: str) -> None:
        self._clear()
        print(printable(text), file=self.stream, flush=True)
        self._draw(force=True)

    def _bar(self, done: int, total: int) -> str:
        filled = int(self.WIDTH * done / total) if total else self.WIDTH
        return "[" + "=" * filled + " " * (self.WIDTH - filled) + "]"

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        self._clear()
        lines = [f"{name[:19]} {self._bar(d, t)} {_size(d)}/{_size(t)} {note}"
                 for name, (d, t, note) in self.items.items()]
        done = sum(i[0] for i in self.items.values())
        total = sum(i[1] for i in self.items.values())
        lines.append(f"{'total':19} {self._bar(done, total)} {_size(done)}/{_size(total)}")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self._draw(force=True)


def for_terminal(quiet: bool, stream=sys.stderr) -> Progress:
    if quiet:
        return Quiet()
    return Bars(stream) if stream.isatty() else Lines(stream)
