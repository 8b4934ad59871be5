"""What every study shares: seeds, mean ± std, the "beyond the seed spread" rule, the output files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def beyond_spread(a: tuple[float, float], b: tuple[float, float], n: int) -> str:
    """A difference of means counts as real when it exceeds the sum of the two standard deviations."""
    if n < 2:
        return "n/a (1 seed)"
    return "yes" if abs(a[0] - b[0]) > a[1] + b[1] else "no"


def write_outputs(out: Path, table: str, payload: dict) -> None:
    """``OUT/table.md`` and ``OUT/runs.json`` (the plot is the study's own)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "runs.json").write_text(json.dumps(payload, indent=1))
