"""The main job (``make quickstart``): code search over Python's own standard library.

Builds (docstring summary -> function source) pairs from the installed standard library,
holds whole modules back for evaluation, and reports retrieval quality of the model on
the held-out modules. The data exists on every machine with Python, so this runs on a
fresh clone without ../shared.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from embforge.data.stdlib_code import collect_pairs, split_pairs, write_beir, write_pairs_jsonl
from embforge.eval.tasks import TaskConfig, evaluate_task

EVAL_QUERIES = 600


def build_stdlib_data(out_dir: Path, console: Console) -> tuple[Path, Path]:
    """Write train pairs (JSONL) and the held-out BEIR folder; print what was kept and skipped."""
    pairs, stats = collect_pairs()
    train, held = split_pairs(pairs, stats)
    console.print(
        f"stdlib: {stats.files} files, {stats.functions} functions -> {len(train)} train pairs, "
        f"{len(held)} held-out pairs; skipped: {dict(stats.skipped)}"
    )
    train_file = write_pairs_jsonl(train, out_dir / "train.jsonl")
    beir = write_beir(held, out_dir / "heldout", split="test", max_queries=EVAL_QUERIES)
    return train_file, beir


def heldout_task(beir: Path) -> TaskConfig:
    return TaskConfig(name="stdlib-code-search", type="retrieval", path=str(beir), split="test", k_values=[1, 10, 100])


def run_quickstart(out_dir: Path, model_name: str = "all-MiniLM-L6-v2") -> dict:
    from embforge.models.embedder import Embedder

    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    _, beir = build_stdlib_data(out_dir / "data", console)
    model = Embedder.load(model_name)
    result = evaluate_task(model, heldout_task(beir), Path("."), batch_size=32)
    (entry,) = result["scores"]["test"]
    console.print(
        f"{model_name} on held-out stdlib code search: nDCG@10 {100 * entry['ndcg_at_10']:.2f}, "
        f"Recall@100 {100 * entry['recall_at_100']:.2f}, MRR@10 {100 * entry['mrr_at_10']:.2f}"
    )
    return result
