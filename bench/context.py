"""What every section of the benchmark is handed: its scratch directory and how long to run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Context:
    workdir: Path
    quick: bool
    rounds: int          # each measurement alternates Kura and the reference this many times
    seconds: float       # length of one load-generator run
    workers: int | None  # `kura serve --workers`; None: its default

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def median(values: list[float]) -> float:
    return statistics.median(values)
