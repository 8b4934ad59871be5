"""NV-Embed's two-stage recipe at CPU size on SmolLM2-135M, with the paper's ablation directions.

Trains ``src/embforge/recipes/nv_embed/cpu_smollm2.yaml`` through ``embforge train`` (the
command users run) three times — the recipe (bidirectional + latent attention), causal +
last token, bidirectional + mean (arXiv 2405.17428 Tables 2/3) — and evaluates the
untrained SmolLM2 (mean pooling, with its own causal mask and with the mask removed) and each trained model on shared tasks that training never
saw (retrieval and STS). Writes a Markdown table, a JSON file and a bar chart under --out;
the last output line is one JSON object.

    python bench/nv_embed_cpu.py [--variants recipe causal_last bidir_mean] [--set stages.0.steps=100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "embforge" / "recipes" / "nv_embed" / "cpu_smollm2.yaml"
TASKS = REPO / "tasks" / "shared_mteb.yaml"
# none shares text with the recipe's training data (tests/unit/train/test_held_out.py)
HELD_OUT = ["DBPedia-Subset", "STS13", "STS15", "STS16", "BIOSSES"]
VARIANTS = {
    "recipe": [],  # bidirectional + latent attention (the paper's choice)
    "causal_last": ["model.attention=causal", "model.pooling=last"],
    "bidir_mean": ["model.pooling=mean"],
}


def run(cmd: list[str], log: Path) -> float:
    """Run an embforge command, its output to ``log``; return wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed; see {log}")
    return time.perf_counter() - start


def evaluate(model: str, out: Path, name: str, extra: list[str]) -> dict[str, float]:
    result = out / f"eval_{name}.json"
    if not result.is_file():
        cmd = [
            sys.executable,
            "-m",
            "embforge",
            "eval",
            model,
            "--tasks",
            str(TASKS),
            "--only",
            *HELD_OUT,
            "--batch-size",
            "64",
        ]
        run([*cmd, *extra, "--output", str(result)], out / f"eval_{name}.log")
    report = json.loads(result.read_text())
    return {r["task_name"]: 100 * next(iter(r["scores"].values()))[0]["main_score"] for r in report["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/nv_embed_cpu_bench")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="recipe override for every variant")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = ["--max-seq-len", "64", "--pooling", "mean"]
    rows = {
        "untrained (causal, mean)": evaluate(
            "SmolLM2-135M-Instruct", out, "untrained_causal", [*base, "--attention", "causal"]
        ),
        "untrained (bidirectional, mean)": evaluate("SmolLM2-135M-Instruct", out, "untrained", base),
    }
    train_seconds = {}
    for variant in args.variants:
        run_dir = out / variant
        overrides = [f"output_dir={run_dir}", *args.set, *VARIANTS[variant]]
        if not (run_dir / "final").is_dir():
            train_seconds[variant] = run(
                [sys.executable, "-m", "embforge", "train", str(RECIPE), *[x for o in overrides for x in ("--set", o)]],
                out / f"train_{variant}.log",
            )
        rows[variant] = evaluate(str(run_dir / "final"), out, variant, [])

    tasks = HELD_OUT
    lines = ["| model | " + " | ".join(tasks) + " | STS mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, scores in rows.items():
        sts = [scores[t] for t in tasks if t.startswith(("STS", "BIOSSES"))]
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.2f}" for t in tasks) + f" | {sum(sts) / len(sts):.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"scores": rows, "train_seconds": train_seconds}, indent=2))
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(rows)
        for i, (name, scores) in enumerate(rows.items()):
            ax.bar([j + i * width for j in range(len(tasks))], [scores[t] for t in tasks], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
        ax.set_ylabel("score x100 (nDCG@10 / Spearman)")
        import torch

        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        ax.set_title(f"NV-Embed twin on SmolLM2-135M ({where}): held-out tasks")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "nv_embed_cpu.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(json.dumps({"bench": "nv_embed_cpu", "scores": rows, "train_seconds": train_seconds}))


if __name__ == "__main__":
    main()
