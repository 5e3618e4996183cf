"""One row per measurement: Kura's value, the reference's, their ratio against the target;
printed as a table, written as JSON, drawn as a chart of speed-ups."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    section: str
    metric: str
    unit: str            # "req/s", "MiB/s" (higher is better) or "ms", "s" (lower is better)
    kura: float
    reference: float | None = None
    reference_name: str = "distribution"
    target: float | None = None  # the speed-up asked for: kura/reference for rates, reference/kura for times
    detail: str = ""             # p50/p99 and the like, as text
    samples: dict = field(default_factory=dict)  # raw values of every round

    @property
    def higher_is_better(self) -> bool:
        return self.unit in ("req/s", "MiB/s")

    @property
    def speedup(self) -> float | None:
        """How many times better Kura is (above 1: better), whatever the unit."""
        if self.reference is None or not self.reference or not self.kura:
            return None
        return self.kura / self.reference if self.higher_is_better else self.reference / self.kura

    @property
    def ratio_text(self) -> str:
        """The ratio in the issue's terms: kura/reference of the measured quantity."""
        if self.reference is None or not self.reference:
            return ""
        return f"{self.kura / self.reference:.2f}×"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        return f"≥ {self.target:g}×" if self.higher_is_better else f"≤ {1 / self.target:.2g}×"

    @property
    def met(self) -> str:
        if self.target is None or self.speedup is None:
            return ""
        return "met" if self.speedup >= self.target else "MISSED"


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("req/s",):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.0f} ms"
    return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    lines = ["| section | metric | Kura | reference | ratio | target | | p50 / p99 and notes |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for row in rows:
        reference = _number(row.reference, row.unit)
        if row.reference is not None and row.reference_name != "distribution":
            reference += f" ({row.reference_name})"
        lines.append(f"| {row.section} | {row.metric} | {_number(row.kura, row.unit)} | {reference} | "
                     f"{row.ratio_text} | {row.target_text} | {row.met} | {row.detail} |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path, context: dict) -> None:
    records = [dict(asdict(row), speedup=row.speedup, met=row.met) for row in rows]
    path.write_text(json.dumps({"context": context, "rows": records}, indent=1) + "\n")


class NoChart:
    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False


def write_chart(rows: list[Row], path: Path, title: str) -> bool | NoChart:
    """A bar per compared row: Kura's speed-up over the reference (log scale), the target as a
    tick. A false NoChart saying why when there is nothing to draw or no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return NoChart("matplotlib is not installed: make install-bench")
    compared = [row for row in rows if row.speedup]
    if not compared:
        return NoChart("no row compares Kura with a reference")
    height = max(3.0, 0.32 * len(compared) + 1.2)
    figure, axes = plt.subplots(figsize=(12, height))
    names = [f"{row.section}: {row.metric}" for row in compared]
    values = [row.speedup for row in compared]
    colours = ["#2a7" if row.met != "MISSED" else "#d54" for row in compared]
    positions = range(len(compared))
    axes.barh(positions, values, color=colours)
    for position, row in zip(positions, compared):
        if row.target:
            axes.plot([row.target, row.target], [position - 0.4, position + 0.4], color="black", linewidth=2)
    axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(list(positions), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    low = min(min(values), 1.0) / 1.5
    high = max(max(values), max((row.target or 1) for row in compared)) * 1.5
    axes.set_xlim(low, high)
    axes.set_xlabel("times better than the reference (log scale; black tick: target; red: target missed)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.subplots_adjust(left=0.42)  # room for the longest metric name
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
