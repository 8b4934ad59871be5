"""Study: Nomic Embed's contrastive pre-training — consistency filtering on vs off, and the MLM checkpoint vs random init (arXiv 2402.01613 §4.1–4.2).

Question: Nomic filters its weakly related pairs for consistency (a pair stays when its document
ranks in the top 2 of its query's candidates within its source, by a small embedder) and starts
contrastive training from an MLM-pre-trained encoder. At CPU size, does each help?

Set-up, scaled to 2 CPU cores (what was shrunk is said): the Nomic CPU twin
(``recipes/nomic_embed/cpu_twin_mlm.yaml`` then ``cpu_twin_contrastive.yaml``): a 4 x 128
nomic-bert (the paper's 12 x 768), MLM for 300 steps of 32 chunks of 128 tokens on WikiText-2,
then contrastive pre-training for 60 steps of batch 128 (the paper's 16,384) with GradCache, one
source per batch, τ 0.02, task prefixes, on four sources (WikiText-2 title → body, SNLI entailment,
MRPC paraphrases, STS-B pairs scored ≥ 4; the paper's 29 sources, 235M pairs after filtering);
no fine-tuning stage. Variants:

- ``filtered-mlm``: the recipe — pairs filtered (top-2 by the packaged all-MiniLM-L6-v2), from
  that seed's MLM checkpoint;
- ``raw-mlm``: the same sources unfiltered (every pair), from the same MLM checkpoint;
- ``filtered-random``: filtered pairs, from a randomly initialised nomic-bert of the same shape
  (the recipe's preset with a tokenizer: no MLM).

Sources are drawn in proportion to their (filtered or raw) size. Each seed of ``--seeds`` runs
its own MLM stage (the seed sets the initialisation, the MLM batches and masks) and the
contrastive stage's batches. Evaluated, none of them trained on: MLQuestions (dev) and
DBPedia-Subset nDCG@10, STS13 and BIOSSES (cosine Spearman), EmotionClassification (accuracy).

Writes ``OUT/table.md`` (mean ± std per variant, compared with ``filtered-mlm``; a difference
counts as real when it exceeds the sum of the two stds), ``OUT/runs.json`` and ``OUT/nomic.png``.
Finished runs are reused (``WORK``).

    python studies/nomic_pretraining.py [--seeds 0,1,2] [--variants filtered-mlm,raw-mlm,filtered-random]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (
    bar_plot,
    compare_table,
    run_all,
    seeds_line,
    shared_root,
    study_parser,
    summarise,
    task_scores,
    write_outputs,
)

TASKS = ["MLQuestions", "DBPedia-Subset", "STS13", "BIOSSES", "EmotionClassification"]
VARIANTS = ("filtered-mlm", "raw-mlm", "filtered-random")
MLM_RECIPE = "nomic_embed/cpu_twin_mlm.yaml"
CONTRASTIVE_RECIPE = "nomic_embed/cpu_twin_contrastive.yaml"


def prepare(shared: Path, data: Path) -> dict[str, dict[str, int]]:
    """``raw/<source>.jsonl`` (every pair) and ``filtered/<source>.jsonl`` (top-2 consistent); their sizes."""
    from embforge.apps.nomic_cpu import TEACHER, raw_pairs, write_jsonl
    from embforge.data.filtering import consistency_filter
    from embforge.models.embedder import Embedder

    teacher = None
    sizes: dict[str, dict[str, int]] = {"raw": {}, "filtered": {}}
    for name, rows in raw_pairs(shared).items():
        raw, filtered = data / "raw" / f"{name}.jsonl", data / "filtered" / f"{name}.jsonl"
        if not raw.is_file():
            write_jsonl(raw, rows)
        if not filtered.is_file():
            teacher = teacher or Embedder.load(TEACHER, max_seq_len=128)
            consistency_filter(teacher, raw, filtered, top_k=2, batch_size=64)
        for kind, path in (("raw", raw), ("filtered", filtered)):
            sizes[kind][name] = sum(1 for _ in path.open(encoding="utf-8"))
    return sizes


def mlm_checkpoint(seed: int, work: Path, shared: Path) -> tuple[Path, dict]:
    """The seed's MLM-trained model (trained once, reused by every variant) and its masked-token accuracy."""
    from embforge.data.io import read_jsonl
    from embforge.train.mlm import mlm_summary
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe, stage_dirs

    folder = work / f"mlm-seed{seed}"
    recipe, _ = load_recipe(recipe_path(MLM_RECIPE), [f"output_dir={folder}", f"data_root={shared}", f"seed={seed}"])
    if not (folder / "final" / "embforge.json").is_file():
        run_recipe(recipe, shared, device="cpu")
    return folder / "final", mlm_summary(read_jsonl(stage_dirs(recipe)[0] / "metrics.jsonl"))


def run_one(variant: str, seed: int, sizes: dict, data: Path, work: Path, shared: Path) -> dict:
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    folder = work / f"{variant}-seed{seed}"
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    kind, init = variant.split("-")
    result: dict = {"variant": variant, "seed": seed}
    if init == "mlm":
        start, result["mlm"] = mlm_checkpoint(seed, work, shared)
        model = [f"model.name_or_path={start}"]
    else:  # the MLM recipe's model (preset, shape, tokenizer) with random weights
        shape, _ = load_recipe(recipe_path(MLM_RECIPE))
        model = [
            f"model.name_or_path={shape.model.name_or_path}",
            f"model.preset_overrides={json.dumps(shape.model.preset_overrides)}",
            f"model.tokenizer={shape.model.tokenizer}",
        ]
    recipe, _ = load_recipe(recipe_path(CONTRASTIVE_RECIPE), [f"data_root={data}"])
    names = [d.name for d in recipe.stages[0].data.datasets]
    overrides = [
        f"data_root={data}",
        f"output_dir={folder}",
        f"seed={seed}",
        *model,
        *(f"stages.0.data.datasets.{i}.path={kind}/{n}.jsonl" for i, n in enumerate(names)),
        *(f"stages.0.data.datasets.{i}.weight={sizes[kind][n]}" for i, n in enumerate(names)),
    ]
    recipe, _ = load_recipe(recipe_path(CONTRASTIVE_RECIPE), overrides)
    begin = time.perf_counter()
    run_recipe(recipe, data, device="cpu")
    result.update(overrides=overrides, train_s=round(time.perf_counter() - begin, 1))
    result["scores"] = task_scores(Embedder.load(folder / "final", device="cpu"), shared, TASKS)
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = study_parser(__doc__, "nomic_pretraining")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if VARIANTS[0] not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: names from {list(VARIANTS)}, {VARIANTS[0]!r} among them (the reference)")
    shared = shared_root(args, ["wikitext2", "snli", "mrpc", "stsbenchmark", "mlquestions_dev"])
    out, work = Path(args.out), Path(args.work).resolve()
    data = work / "data"
    sizes = prepare(shared, data)
    runs = run_all(
        args.seeds,
        variants,
        lambda v, seed: run_one(v, seed, sizes, data, work, shared),
        work if args.cached_only else None,
    )
    n, rows = summarise(runs, variants, TASKS)
    kept = ", ".join(f"{k} {sizes['filtered'][k]:,} of {sizes['raw'][k]:,}" for k in sizes["raw"])
    mlm = [r["mlm"]["masked_acc_after"] for r in runs if "mlm" in r and r["variant"] == VARIANTS[0]]
    header = (
        f"Contrastive 60 steps of batch 128 on four sources (pairs kept by the filter: {kept}); "
        f"MLM masked-token accuracy after 300 steps: {', '.join(f'{a:.2f}' for a in mlm)} %; "
        f"{seeds_line(n)}; x100.\n\n"
    )
    table = header + compare_table(rows, VARIANTS[0], n)
    write_outputs(out, table, {"sizes": sizes, "runs": runs})
    bar_plot(rows, "Nomic Embed contrastive pre-training, 4 x 128 nomic-bert", out / "nomic.png")
    print(table)


if __name__ == "__main__":
    main()
