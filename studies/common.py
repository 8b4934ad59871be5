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
    parser.add_argument("--cached-only", action="store_true", help="tabulate the finished runs only; train nothing")
    return parser


def shared_root(args: argparse.Namespace, needs: list[str]) -> Path:
    """The shared datasets folder, or exit naming the folders the study needs."""
    shared = Path(args.data_root).resolve()
    if not (shared / needs[0]).is_dir():
        sys.exit(f"needs the shared datasets ({', '.join(needs)}, ...) under {shared}")
    return shared


def nq_finetune_overrides(data: Path, folder: Path, seed: int, steps: int, batch: int) -> list[str]:
    """Nomic's fine-tuning stage (``nomic_embed/cpu_twin_finetune.yaml``) from the packaged MiniLM, at CPU size:
    ``steps`` steps of ``batch``, the warm-up in proportion, bf16 autocast where the CPU runs it natively."""
    return [
        "model.name_or_path=all-MiniLM-L6-v2",
        f"data_root={data}",
        f"output_dir={folder}",
        f"seed={seed}",
        f"stages.0.steps={steps}",
        f"stages.0.optim.warmup_steps={max(1, steps // 15)}",  # the recipe's 4 of 60, in proportion
        "stages.0.precision=auto",
        f"stages.0.data.batch_size={batch}",
    ]


def task_scores(model, shared: Path, tasks: list[str]) -> dict[str, float]:
    """``model``'s main score (x100) on each of ``tasks`` of ``tasks/shared_mteb.yaml``, through ``embforge eval``'s runner."""
    from embforge.eval.runner import load_suite, main_scores, run_suite

    suite, root = load_suite(REPO / "tasks" / "shared_mteb.yaml", data_root=shared)
    return {k: float(v) for k, v in main_scores(run_suite(model, suite, root, batch_size=64, only=tasks)).items()}


def run_all(seeds: str, variants, run: Callable[[str, int], dict], cached_only: Path | None = None) -> list[dict]:
    """``run(variant, seed)`` for every seed and variant, seed by seed (finished runs are the study's to reuse).

    ``cached_only``: the study's work folder; only runs finished there (``<variant>-seed<seed>/scores.json``)
    are taken, nothing is trained (a table of what has run so far)."""
    runs = []
    for seed in (int(s) for s in seeds.split(",")):
        for variant in variants:
            if cached_only is not None and not (cached_only / f"{variant}-seed{seed}" / "scores.json").is_file():
                print(f"== {variant} seed {seed}: not run (--cached-only)", flush=True)
                continue
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


def compare_table(
    rows: dict[str, dict[str, tuple[float, float]]], ref: str, n: dict[str, int], base: dict | None = None
) -> str:
    """Tasks down, variants across (mean ± std over ``n[variant]`` seeds), each variant's difference from
    ``ref`` and whether it exceeds the seed spread; ``base``: a column of the untrained model's scores."""
    tasks = list(rows[ref])
    head = (["base"] if base else []) + [f"{v} (n={n[v]})" for v in rows]
    lines = ["| task | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for t in tasks:
        cells = [f"{base[t]:.2f}"] if base else []
        for v, cell in rows.items():
            m, s = cell[t]
            beyond = beyond_spread(cell[t], rows[ref][t], min(n[v], n[ref]))
            delta = "" if v == ref else f" ({m - rows[ref][t][0]:+.2f} vs {ref}; beyond: {beyond})"
            cells.append(f"{m:.2f} ± {s:.2f}{delta}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(runs: list[dict], variants: list[str], tasks: list[str]) -> tuple[dict[str, int], dict]:
    """Per variant, its number of seeds and, per task, the mean ± std of ``run["scores"][task]``
    (variants without a finished run are left out)."""
    variants = [v for v in variants if any(r["variant"] == v for r in runs)]
    counts = {v: sum(r["variant"] == v for r in runs) for v in variants}
    return counts, {
        v: {t: mean_std([r["scores"][t] for r in runs if r["variant"] == v]) for t in tasks} for v in variants
    }


def seeds_line(counts: dict[str, int]) -> str:
    """``3 seeds per variant``, or the count of each variant where they differ."""
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} seeds per variant"
    return "seeds per variant: " + ", ".join(f"{v} {n}" for v, n in counts.items())


def bar_plot(rows: dict[str, dict[str, tuple[float, float]]], title: str, path: Path, base: dict | None = None) -> None:
    """Grouped bars (mean ± std) per task and variant; ``base``: the untrained model as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(tasks)), 4))
    width = 0.8 / len(rows)
    for i, (variant, cells) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [cells[t][0] for t in tasks], width, yerr=[cells[t][1] for t in tasks], capsize=3, label=variant)
    centres = [j + width * (len(rows) - 1) / 2 for j in range(len(tasks))]
    if base:
        ax.scatter(centres, [base[t] for t in tasks], marker="_", s=400, color="black", label="base", zorder=3)
    ax.set_xticks(centres, labels=tasks, fontsize=8)
    ax.set(ylabel="score x100 (mean ± std over seeds)", title=title)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
