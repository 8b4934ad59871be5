"""Study: which hard negatives to train with — none, random, naive top-k, or positive-aware mined (NV-Embed §3.3, Table 5).

Question: NV-Embed mines hard negatives "positive-aware" (TopK-PercPos: the teacher's top
candidates, none scoring above 0.95 x the positive) because naive top-k mining picks up false
negatives. Does that order hold — positive-aware > naive top-k, and mined > random > none?

Set-up, scaled to 2 CPU cores (what was shrunk is said): Nomic's fine-tuning stage
(``recipes/nomic_embed/cpu_twin_finetune.yaml``: Natural Questions (question, passage) pairs,
temperature 0.02, in-batch negatives kept) started from the packaged all-MiniLM-L6-v2 instead of
a 7B decoder, without the Matryoshka loss, ``--steps`` steps of batch 16 with 7 negatives per query
(in place of NV-Embed's batch 128 with 7 negatives for 20k steps), bf16 autocast where the CPU has
it. The negatives, all from NQ's own passages and found by the same teacher (MiniLM itself):

- ``none``: in-batch negatives only (``num_negatives=0``);
- ``random``: 7 passages drawn at random from the whole pool (not the positive);
- ``naive``: the teacher's top 7, whatever their score (false negatives included);
- ``mined``: the teacher's top 7 below 0.95 x the positive's score (positive-aware, the recipe's).

Every variant trains on the same pairs (those all three mining kinds give 7 negatives), each with
every seed of ``--seeds`` (the seed changes the batches and the data order). Evaluated, with
nothing of them trained on: MLQuestions (dev) and DBPedia-Subset nDCG@10, STS13 and BIOSSES
(cosine Spearman), EmotionClassification (accuracy).

Writes ``OUT/runs.json``, ``OUT/table.md`` (mean ± std per variant, each compared with ``mined``;
a difference counts as real when it exceeds the sum of the two stds) and ``OUT/negatives.png``.
Rerunning reuses finished runs (``WORK``).

    python studies/hard_negatives.py [--seeds 0,1,2] [--steps 60] [--variants none,random,naive,mined]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (
    bar_plot,
    compare_table,
    nq_finetune_overrides,
    run_all,
    seeds_line,
    shared_root,
    study_parser,
    summarise,
    task_scores,
    write_outputs,
)

BATCH = 16
TASKS = ["MLQuestions", "DBPedia-Subset", "STS13", "BIOSSES", "EmotionClassification"]
# kind -> the mining settings (mine_nq's keywords) of its file; None: no file of its own
MINING = {
    "none": None,
    "random": {"sampling": "random", "search_depth": 100_000, "max_score_ratio": None},
    "naive": {"max_score_ratio": None},
    "mined": {},
}


def prepare(shared: Path, data: Path) -> dict[str, str]:
    """One negatives file per mining kind, all restricted to the pairs every kind could fill."""
    from rich.console import Console

    from embforge.apps.nomic_cpu import mine_nq, write_jsonl
    from embforge.data.io import read_jsonl
    from embforge.models.embedder import Embedder

    files = {kind: data / "finetune" / f"nq_{kind}.jsonl" for kind, opts in MINING.items() if opts is not None}
    raw = {kind: path.with_suffix(".all.jsonl") for kind, path in files.items()}
    if not all(p.is_file() for p in files.values()):
        teacher = Embedder.load("all-MiniLM-L6-v2", max_seq_len=128)
        for kind, path in raw.items():
            if not path.is_file():
                mine_nq(shared, path, teacher, Console(), **MINING[kind])
        rows = {kind: read_jsonl(path, fields=("query", "positive", "negatives")) for kind, path in raw.items()}
        common = set.intersection(*({(r["query"], r["positive"]) for r in rs} for rs in rows.values()))
        for kind, path in files.items():
            write_jsonl(path, [r for r in rows[kind] if (r["query"], r["positive"]) in common])
    return {kind: str(path.relative_to(data)) for kind, path in files.items()}


def run_one(variant: str, seed: int, steps: int, files: dict, data: Path, work: Path, shared: Path) -> dict:
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    folder = work / f"{variant}-seed{seed}"
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    negatives = ["stages.0.data.num_negatives=0"] if variant == "none" else []
    overrides = [
        *nq_finetune_overrides(data, folder, seed, steps, BATCH),
        f"stages.0.data.datasets.0.path={files['mined' if variant == 'none' else variant]}",
        "stages.0.loss.matryoshka_dims=[]",
        "stages.0.loss.matryoshka_weights=null",
        *negatives,
    ]
    recipe, _ = load_recipe(recipe_path("nomic_embed/cpu_twin_finetune.yaml"), overrides)
    start = time.perf_counter()
    run_recipe(recipe, data)
    train_s = time.perf_counter() - start
    result = {"variant": variant, "seed": seed, "overrides": overrides, "train_s": round(train_s, 1)}
    result["scores"] = task_scores(Embedder.load(folder / "final", device="cpu"), shared, TASKS)
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = study_parser(__doc__, "hard_negatives")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default=",".join(MINING))
    args = parser.parse_args()
    variants = args.variants.split(",")
    if "mined" not in variants or not set(variants) <= set(MINING):
        parser.error(f"--variants: names from {list(MINING)}, 'mined' among them (the others are compared with it)")
    shared = shared_root(args, ["nq_question_passage_pairs", "mlquestions_dev", "dbpedia_entity_subset"])
    from embforge.models.embedder import Embedder

    out, work = Path(args.out), Path(args.work).resolve()
    data = work / "data"
    files = prepare(shared, data)
    base_file = work / "base.json"
    if not base_file.is_file():
        base_file.write_text(json.dumps(task_scores(Embedder.load("all-MiniLM-L6-v2", device="cpu"), shared, TASKS)))
    base = json.loads(base_file.read_text())
    runs = run_all(
        args.seeds,
        variants,
        lambda v, seed: run_one(v, seed, args.steps, files, data, work, shared),
        work if args.cached_only else None,
    )
    n, rows = summarise(runs, variants, TASKS)
    pairs = sum(1 for _ in (data / files["mined"]).open(encoding="utf-8"))
    header = f"{pairs:,} NQ pairs, {args.steps} steps of batch {BATCH}; {seeds_line(n)}; x100.\n\n"
    table = header + compare_table(rows, "mined", n, base)
    write_outputs(out, table, {"steps": args.steps, "batch": BATCH, "pairs": pairs, "base": base, "runs": runs})
    bar_plot(rows, "Hard negatives for a MiniLM fine-tune on NQ", out / "negatives.png", base)
    print(table)


if __name__ == "__main__":
    main()
