"""Study: the Matryoshka curve (float and binary) with and without the Matryoshka loss (Nomic Embed v1.5).

Question: does training with the Matryoshka loss (InfoNCE summed over nested prefixes of the
embedding, arXiv 2205.13147; Nomic Embed v1.5 over 768/512/256/128/64) keep retrieval quality at
small widths, and what does it cost at full width?

Set-up, scaled to 2 CPU cores (what was shrunk is said): Nomic's fine-tuning stage
(``recipes/nomic_embed/cpu_twin_finetune.yaml``: Natural Questions pairs with 7 hard negatives
mined by the teacher below 0.95 x the positive, temperature 0.02, v1.5's ``layer_norm`` inference
rule) started from the packaged all-MiniLM-L6-v2 (384 dimensions) instead of a contrastively
pre-trained nomic-bert; ``--steps`` steps of batch 16 (7 negatives each) instead of one epoch of
batch 256, bf16 autocast where the CPU has it. Variants:
``matryoshka`` (loss over 384/192/96/48/24, equal weights) and ``plain`` (full width only), each
with every seed of ``--seeds``; the seed changes the batches and the data order. Evaluated, with
nothing of them trained on: MLQuestions (dev) nDCG@10 at each width, float and binary (Hamming)
search; STS13 and BIOSSES (cosine Spearman) and EmotionClassification (accuracy) at full width.

Writes ``OUT/runs.json`` (every run: variant, seed, overrides, scores), ``OUT/table.md`` (mean ±
std per variant; a difference counts as real when it exceeds the sum of the two stds) and
``OUT/matryoshka.png``. Rerunning reuses finished runs (``WORK``).

    python studies/matryoshka.py [--seeds 0,1,2] [--steps 60] [--out docs/studies/matryoshka]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (
    REPO,
    beyond_spread,
    mean_std,
    nq_finetune_overrides,
    run_all,
    shared_root,
    study_parser,
    write_outputs,
)

DIMS = [384, 192, 96, 48, 24]
BATCH = 16  # the twin recipe's 32 (the paper's 256), halved again for MiniLM's cost per step on 2 cores
GENERAL = ["STS13", "BIOSSES", "EmotionClassification"]
CURVE_TASK = "MLQuestions"
VARIANTS = {
    "matryoshka": [f"stages.0.loss.matryoshka_dims={DIMS}", f"stages.0.loss.matryoshka_weights={[1] * len(DIMS)}"],
    "plain": ["stages.0.loss.matryoshka_dims=[]", "stages.0.loss.matryoshka_weights=null"],
}


def run_one(variant: str, seed: int, steps: int, data: Path, work: Path, shared: Path) -> dict:
    from embforge.models.embedder import Embedder
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe

    folder = work / f"{variant}-seed{seed}"
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [
        *nq_finetune_overrides(data, folder, seed, steps, BATCH),
        *VARIANTS[variant],
    ]
    recipe, _ = load_recipe(recipe_path("nomic_embed/cpu_twin_finetune.yaml"), overrides)
    start = time.perf_counter()
    run_recipe(recipe, data)
    train_s = time.perf_counter() - start
    scores = {
        "variant": variant,
        "seed": seed,
        "overrides": overrides,
        "train_s": round(train_s, 1),
        **evaluate(Embedder.load(folder / "final", device="cpu"), shared),
    }
    done.write_text(json.dumps(scores, indent=1))
    return scores


def evaluate(model, shared: Path) -> dict:
    """The Matryoshka curve on :data:`CURVE_TASK` and the full-width :data:`GENERAL` scores (x100)."""
    from embforge.eval.runner import load_suite, main_scores, run_suite
    from embforge.eval.tasks import eval_retrieval_dims

    suite, root = load_suite(REPO / "tasks" / "shared_mteb.yaml", data_root=shared)
    (task,) = [t for t in suite.tasks if t.name == CURVE_TASK]
    curve = eval_retrieval_dims(model, task, root / task.path, DIMS, batch_size=64)
    general = main_scores(run_suite(model, suite, root, batch_size=64, only=GENERAL))
    return {
        "curve": {d: {k: 100 * v for k, v in s.items()} for d, s in curve.items()},
        "general": {k: float(v) for k, v in general.items()},
    }


def summarise(runs: list[dict], base: dict) -> tuple[str, dict]:
    """The table (Markdown) and the numbers behind it."""
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        cells = {}
        for d in map(str, DIMS):
            for kind in ("float", "binary"):
                cells[f"{kind} {d}"] = mean_std([r["curve"][d][kind] for r in mine])
        for name in mine[0]["general"]:
            cells[name] = mean_std([r["general"][name] for r in mine])
        rows[variant] = cells
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"| metric | base MiniLM | matryoshka (n={len(seeds)}) | plain (n={len(seeds)}) | Δ (m − p) | beyond seed spread? |",
        "|---|---|---|---|---|---|",
    ]
    for key in rows["matryoshka"]:
        kind, _, d = key.partition(" ")
        if kind in ("float", "binary"):
            b = base["curve"][d][kind]
            label = f"MLQuestions nDCG@10, {kind}, {d} dims"
        else:
            b = base["general"][key]
            label = key
        (m, ms), (p, ps) = rows["matryoshka"][key], rows["plain"][key]
        real = beyond_spread((m, ms), (p, ps), len(seeds))
        lines.append(f"| {label} | {b:.2f} | {m:.2f} ± {ms:.2f} | {p:.2f} ± {ps:.2f} | {m - p:+.2f} | {real} |")
    return "\n".join(lines) + "\n", rows


def plot(rows: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, kind in zip(axes, ("float", "binary")):
        for variant, style in (("matryoshka", "o-"), ("plain", "s--")):
            means = [rows[variant][f"{kind} {d}"][0] for d in DIMS]
            stds = [rows[variant][f"{kind} {d}"][1] for d in DIMS]
            ax.errorbar(DIMS, means, yerr=stds, fmt=style, capsize=3, label=f"{variant} (mean ± std)")
        ax.plot(DIMS, [base["curve"][str(d)][kind] for d in DIMS], ":", color="grey", label="base MiniLM")
        ax.set_xscale("log", base=2)
        ax.set_xticks(DIMS, labels=[str(d) for d in DIMS])
        ax.set(xlabel="embedding dimensions", ylabel="MLQuestions nDCG@10", title=f"{kind} search")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, "matryoshka")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    shared = shared_root(args, ["nq_question_passage_pairs", "mlquestions_dev"])
    from rich.console import Console

    from embforge.apps.nomic_cpu import mine_nq
    from embforge.models.embedder import Embedder

    out, work = Path(args.out), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    mined = data / "finetune" / "nq_mined.jsonl"
    if not mined.is_file():
        mine_nq(shared, mined, Embedder.load("all-MiniLM-L6-v2", max_seq_len=128), Console())
    base_file = work / "base.json"
    if not base_file.is_file():
        base_file.write_text(json.dumps(evaluate(Embedder.load("all-MiniLM-L6-v2", device="cpu"), shared)))
    base = json.loads(base_file.read_text())
    run = lambda variant, seed: run_one(variant, seed, args.steps, data, work, shared)  # noqa: E731
    runs = run_all(args.seeds, VARIANTS, run, work if args.cached_only else None)
    table, rows = summarise(runs, base)
    write_outputs(out, table, {"steps": args.steps, "base": base, "runs": runs})
    plot(rows, base, out / "matryoshka.png")
    print(table)
    print(json.dumps({v: {k: round(m, 2) for k, (m, _) in r.items()} for v, r in rows.items()}))


if __name__ == "__main__":
    main()
