"""Study: NV-Embed's pooling on a bidirectional decoder, latent attention vs mean (arXiv 2405.17428 Tables 2/3).

Question: the one-run ablations disagreed on the sign (latent attention 13 STS points ahead of
mean pooling in an earlier recipe, 3.7 behind in the current one): which direction holds once
the seed spread is known?

Set-up, scaled to 2 CPU cores (what was shrunk is said): ``recipes/nv_embed/cpu_smollm2.yaml``
(SmolLM2-135M-Instruct, causal mask removed, LoRA r 16, instructions masked out of pooling, two
stages) with stage 1 cut from 260 to ``--stage1-steps`` steps and stage 2 from 80 to
``--stage2-steps`` (warm-ups in proportion). Variants (:data:`VARIANTS`, chosen with
``--variants``; every other one is compared with ``latent``): ``latent`` (the recipe: 512 latents,
8 heads, random initialisation), ``mean``, ``latent-meaninit`` (the latent head starting as exactly
mean pooling), ``latent-headlr`` (the head at 10x the LoRA learning rate), ``last`` (the EOS
token), the causal decoder with ``last`` or ``mean`` pooling, ``stage2-inbatch`` (in-batch negatives
in stage 2), ``stage1-no-hardneg`` (stage 1 without its hard negative) and ``one-stage-blend`` (one
stage of both stages' steps on all their datasets blended, :func:`one_stage_blend`); each with every seed of
``--seeds`` (the seed sets the head's and LoRA's initialisation and the batches). Evaluated on
DBPedia-Subset (retrieval, nDCG@10), STS13 and BIOSSES (cosine Spearman), which no training file
contains (tests/unit/train/test_held_out.py), and EmotionClassification (accuracy on its test
split; stage 2 trains on Emotion's train split, as NV-Embed trains on MTEB classification
training sets, so this column is in-domain).

Writes ``OUT/table.md`` (mean ± std per variant; a difference from ``latent`` counts as real when it exceeds the
sum of the two stds), ``OUT/runs.json`` (every run: variant, seed, overrides, scores, seconds) and
``OUT/pooling.png``. Finished runs are reused (``WORK``).

    python studies/nv_embed_pooling.py [--seeds 0,1,2] [--variants latent,mean] [--stage1-steps 40] [--stage2-steps 8]
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

RECIPE = "nv_embed/cpu_smollm2.yaml"
TASKS = ["DBPedia-Subset", "STS13", "BIOSSES", "EmotionClassification"]
# variant -> its overrides of the recipe; the study runs --variants of them (default: the first two)
VARIANTS = {
    "latent": [],  # the recipe: bidirectional, latent attention initialised randomly
    "mean": ["model.pooling=mean"],
    "latent-meaninit": ["model.pooling.init=mean"],  # the latent head starts as exactly mean pooling
    "latent-headlr": ["stages.0.optim.head_lr=3.0e-3", "stages.1.optim.head_lr=1.5e-3"],  # the head at 10x LoRA's LR
    "last": ["model.pooling=last"],  # the EOS token's state
    "causal-last": ["model.attention=causal", "model.pooling=last"],  # the decoder as it was trained
    "causal-mean": ["model.attention=causal", "model.pooling=mean"],
    # training factors (§3.3): stage 2 with in-batch negatives for its retrieval-like sets (SNLI, MRPC;
    # the classification sets keep them off: their label documents repeat within a batch), and stage 1
    # without its hard negative (in-batch negatives only)
    "stage2-inbatch": [
        "stages.1.loss.in_batch_negatives=true",
        *(f"stages.1.data.datasets.{i}.in_batch_negatives=false" for i in (2, 3, 4)),
    ],
    "stage1-no-hardneg": ["stages.0.data.num_negatives=0"],
    "one-stage-blend": None,  # one stage of both stages' steps on every dataset blended (one_stage_blend)
}


def one_stage_blend(steps: tuple[int, int]) -> list[str]:
    """The recipe as one stage (NV-Embed §3.3's alternative to two): stage 1's retrieval sets and stage 2's
    others drawn together for ``sum(steps)`` steps, with stage 1's loss and learning rate; stage 2's SNLI
    weight split over stage 1's two SNLI files; in-batch negatives on for the retrieval-like sets (SNLI,
    MRPC), off for the classification sets (their label documents repeat within a batch)."""
    from embforge.config import read_yaml
    from embforge.train.recipe import recipe_path

    first, second = read_yaml(recipe_path(RECIPE))["stages"]
    snli_weight = next(d["weight"] for d in second["data"]["datasets"] if d["name"] == "snli")
    datasets = [{**d, "weight": snli_weight / 2} for d in first["data"]["datasets"]]
    for d in second["data"]["datasets"]:
        if d["name"] != "snli":
            datasets.append({**d, "in_batch_negatives": d.get("format") == "sts"})
    total = sum(steps)
    stage = {**first, "name": "blend", "steps": total, "data": {**first["data"], "datasets": datasets}}
    stage["optim"] = {**first["optim"], "warmup_steps": max(1, round(20 * total / 260))}
    return [f"stages={json.dumps([stage])}"]


def run_one(variant: str, seed: int, steps: tuple[int, int], work: Path, shared: Path) -> dict:
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    folder = work / f"{variant}-seed{seed}"
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [
        f"output_dir={folder}",
        f"data_root={shared}",
        f"seed={seed}",
        f"stages.0.steps={steps[0]}",
        f"stages.0.optim.warmup_steps={max(1, round(20 * steps[0] / 260))}",
        f"stages.1.steps={steps[1]}",
        f"stages.1.optim.warmup_steps={max(1, round(8 * steps[1] / 80))}",
        *(one_stage_blend(steps) if variant == "one-stage-blend" else VARIANTS[variant]),
    ]
    recipe, _ = load_recipe(recipe_path(RECIPE), overrides)
    start = time.perf_counter()
    run_recipe(recipe, shared)
    train_s = time.perf_counter() - start
    model = Embedder.load(folder / "final", device="cpu")
    scores = task_scores(model, shared, TASKS)
    result = {"variant": variant, "seed": seed, "overrides": overrides, "train_s": round(train_s, 1), "scores": scores}
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = study_parser(__doc__, "nv_embed_pooling")
    parser.add_argument("--stage1-steps", type=int, default=40)
    parser.add_argument("--stage2-steps", type=int, default=8)
    parser.add_argument("--variants", default="latent,mean", help=f"from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    shared = shared_root(args, ["snli", "mrpc", "dbpedia_entity_subset"])
    work = Path(args.work).resolve()
    steps = (args.stage1_steps, args.stage2_steps)
    variants = args.variants.split(",")
    if "latent" not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: names from {list(VARIANTS)}, 'latent' among them (the others are compared with it)")
    runs = run_all(
        args.seeds,
        variants,
        lambda variant, seed: run_one(variant, seed, steps, work, shared),
        work if args.cached_only else None,
    )
    n, rows = summarise(runs, variants, TASKS)
    table = f"{steps[0]} + {steps[1]} steps; {seeds_line(n)}; x100.\n\n" + compare_table(rows, "latent", n)
    out = Path(args.out)
    write_outputs(out, table, {"steps": list(steps), "runs": runs})
    bar_plot(rows, "NV-Embed pooling and attention on SmolLM2-135M", out / "pooling.png")
    print(table)


if __name__ == "__main__":
    main()
