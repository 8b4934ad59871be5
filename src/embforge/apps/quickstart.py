"""The main job (``make quickstart``): fine-tune MiniLM for code search on your own stdlib.

1. Build (docstring summary -> function source) pairs from the installed Python standard
   library; whole modules are held back for evaluation.
2. Evaluate the packaged all-MiniLM-L6-v2 on the held-out modules ("before").
3. Mine 3 positive-aware hard negatives per training pair with that model as teacher.
4. Train the two-stage recipe ``recipes/quickstart/stdlib_two_stage.yaml``.
5. Evaluate the fine-tuned model on the same held-out modules ("after") and print both.

Everything it needs exists on a fresh machine: no ../shared, no downloads.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from embforge.data.stdlib_code import collect_pairs, split_pairs, write_beir, write_pairs_jsonl
from embforge.eval.task_config import TaskConfig
from embforge.eval.tasks import evaluate_task

EVAL_QUERIES = 600
TRAIN_FILE = "train.jsonl"
RECIPE = "quickstart/stdlib_two_stage.yaml"
METRICS = [
    ("ndcg_at_10", "nDCG@10"),
    ("mrr_at_10", "MRR@10"),
    ("recall_at_10", "Recall@10"),
    ("recall_at_100", "Recall@100"),
]


def build_stdlib_data(out_dir: Path, console: Console) -> tuple[list, Path]:
    """Write train pairs (JSONL) and the held-out BEIR folder; print what was kept and skipped."""
    pairs, stats = collect_pairs()
    train, held = split_pairs(pairs, stats)
    console.print(
        f"stdlib: {stats.files} files, {stats.functions} functions -> {len(train)} train pairs, "
        f"{len(held)} held-out pairs (whole modules); skipped: {dict(stats.skipped)}"
    )
    write_pairs_jsonl(train, out_dir / TRAIN_FILE)
    return train, write_beir(held, out_dir / "heldout", split="test", max_queries=EVAL_QUERIES)


def heldout_task(beir: Path) -> TaskConfig:
    return TaskConfig(name="stdlib-code-search", type="retrieval", path=str(beir), split="test", k_values=[1, 10, 100])


def evaluate(model, beir: Path) -> dict[str, float]:
    (entry,) = evaluate_task(model, heldout_task(beir), Path("."), batch_size=64)["scores"]["test"]
    return entry


def mine_stdlib_negatives(teacher, train: list, train_jsonl: Path, path: Path, console: Console) -> Path:
    """Mine 3 hard negatives per pair of ``train_jsonl`` through :func:`mine_file`, as a user would.

    The corpus is every training positive; rows keep their fields (``source``: the module)
    and gain ``negatives``, ``negative_scores`` and ``positive_score``.
    """
    from embforge.data.mining import MiningConfig, mine_file

    cfg = MiningConfig(num_negatives=3, range_min=2, range_max=30, max_score_ratio=0.95)
    summary = mine_file(teacher, train_jsonl, path, cfg, corpus=[p.positive for p in train], keep_incomplete=True)
    console.print(f"mined hard negatives: {summary['candidates_dropped']}")
    return path


def run_quickstart(out_dir: Path, model_name: str = "all-MiniLM-L6-v2", steps: int | None = None) -> dict:
    """The main job; ``steps`` replaces each stage's step count (a quick look; the recipe's by default)."""
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    console = Console()
    data_dir = out_dir / "data"
    train, beir = build_stdlib_data(data_dir, console)
    base = Embedder.load(model_name)
    before = evaluate(base, beir)
    console.print(f"before: nDCG@10 {100 * before['ndcg_at_10']:.2f} on {EVAL_QUERIES} held-out queries")
    mine_stdlib_negatives(base, train, data_dir / TRAIN_FILE, data_dir / "train_hard.jsonl", console)
    del base

    recipe, _ = load_recipe(
        recipe_path(RECIPE),
        [
            f"data_root={data_dir.resolve()}",
            f"output_dir={(out_dir / 'model').resolve()}",
            f"model.name_or_path={model_name}",
            *([f"stages.{i}.steps={steps}" for i in range(2)] if steps else []),
        ],
    )
    tuned = run_recipe(recipe, data_dir.resolve())
    after = evaluate(tuned, beir)

    table = Table(title=f"held-out stdlib code search ({EVAL_QUERIES} queries from modules training never saw)")
    table.add_column("metric")
    table.add_column(f"{model_name} (before)", justify="right")
    table.add_column("fine-tuned (after)", justify="right")
    table.add_column("Δ", justify="right")
    for key, label in METRICS:
        table.add_row(
            label, f"{100 * before[key]:.2f}", f"{100 * after[key]:.2f}", f"{100 * (after[key] - before[key]):+.2f}"
        )
    console.print(table)
    final = Path(recipe.output_dir) / "final"
    console.print(
        f"model saved to {final} (loads with embforge and sentence-transformers); curves: {Path(recipe.output_dir) / 'curves.png'}"
    )
    return {"before": before, "after": after, "model": str(final)}
