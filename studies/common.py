"""What every study shares: seeds, mean ± std, the "beyond the seed spread" rule, the output files."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def study_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every study takes: seeds, where its outputs and runs go, the shared datasets."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(REPO / "docs" / "studies" / name))
    parser.add_argument("--work", default=str(REPO / "runs" / "studies" / name))
    parser.add_argument("--data-root", default=os.environ.get("EMBFORGE_DATA", str(REPO.parent / "shared" / "data")))
    return parser


def shared_root(args: argparse.Namespace, needs: list[str]) -> Path:
    """The shared datasets folder, or exit naming the folders the study needs."""
    shared = Path(args.data_root).resolve()
    if not (shared / needs[0]).is_dir():
        sys.exit(f"needs the shared datasets ({', '.join(needs)}, ...) under {shared}")
    return shared


def run_all(seeds: str, variants, run: Callable[[str, int], dict]) -> list[dict]:
    """``run(variant, seed)`` for every seed and variant, seed by seed (finished runs are the study's to reuse)."""
    runs = []
    for seed in (int(s) for s in seeds.split(",")):
        for variant in variants:
            print(f"== {variant} seed {seed}", flush=True)
            runs.append(run(variant, seed))
    return runs


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
