"""Domain fine-tuning: does training on MLQuestions pairs improve retrieval on unseen queries?

Splits ../shared/data/mlquestions_dev by query: every query whose row number is not a
multiple of 3 (a fixed 2/3) gives a (query, positive) training pair; the other 1/3 are
evaluated (nDCG@10 over the full 11,000-passage corpus) before and after training with
the recipe ``recipes/minilm/mlquestions_domain.yaml``. The last line is one JSON object.

    python bench/domain_finetune.py [--set stages.0.steps=80 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mlquestions_dev"


def write_split(out: Path) -> tuple[Path, int, int]:
    """train.jsonl from 2/3 of the queries; a BEIR folder ``heldout`` with the other 1/3."""
    from embforge.data.io import load_beir

    corpus, queries, qrels = load_beir(SHARED, "dev")
    ordered = sorted(queries, key=lambda q: int(q[1:]))  # ids Q<row>
    held = [q for q in ordered if int(q[1:]) % 3 == 0]
    train = [q for q in ordered if int(q[1:]) % 3 != 0]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w") as f:
        for q in train:
            for doc, grade in qrels[q].items():
                if grade > 0:
                    f.write(json.dumps({"query": queries[q], "positive": corpus[doc]}) + "\n")
    beir = out / "heldout"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "corpus.jsonl", beir / "corpus.jsonl")
    with (beir / "queries.jsonl").open("w") as f:
        for q in held:
            f.write(json.dumps({"_id": q, "text": queries[q]}) + "\n")
    with (beir / "qrels" / "dev.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in held:
            for doc, grade in qrels[q].items():
                f.write(f"{q}\t{doc}\t{grade}\n")
    return beir, len(train), len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mlquestions_domain")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. stages.0.steps=80")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED}")

    from embforge.eval.task_config import TaskConfig
    from embforge.eval.tasks import evaluate_task
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    out = Path(args.out).resolve()
    beir, n_train, n_held = write_split(out / "data")
    task = TaskConfig(name="MLQuestions-heldout", type="retrieval", path=str(beir), split="dev")

    def ndcg(model) -> float:
        return 100 * evaluate_task(model, task, Path("."), batch_size=64)["scores"]["dev"][0]["ndcg_at_10"]

    before = ndcg(Embedder.load("all-MiniLM-L6-v2"))
    print(f"base all-MiniLM-L6-v2: nDCG@10 {before:.2f} on {n_held} held-out queries", flush=True)
    recipe, _ = load_recipe(
        recipe_path("minilm/mlquestions_domain.yaml"),
        [f"data_root={out / 'data'}", f"output_dir={out / 'model'}", *args.set],
    )
    shutil.rmtree(out / "model", ignore_errors=True)  # this benchmark owns its output folder: always a fresh run
    tuned = run_recipe(recipe, out / "data", resume=False)
    after = ndcg(tuned)
    print(
        f"trained on {n_train} pairs; held-out nDCG@10: before {before:.2f}, after {after:.2f} ({after - before:+.2f})"
    )
    print(
        json.dumps(
            {
                "bench": "domain_finetune",
                "dataset": "mlquestions_dev",
                "train_pairs": n_train,
                "heldout_queries": n_held,
                "ndcg_at_10_before": round(before, 2),
                "ndcg_at_10_after": round(after, 2),
                "delta": round(after - before, 2),
                "overrides": args.set,
            }
        )
    )


if __name__ == "__main__":
    main()
