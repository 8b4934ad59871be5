"""Domain adaptation side by side: base, sentence-transformers' trainer, `embforge adapt` (supervised and corpus-only).

Data: ../shared/data/mlquestions_dev, its queries split by row (every third query held out, as
bench/domain_finetune.py). The training 2/3 become ``queries.jsonl`` + ``qrels/train.tsv`` of a BEIR
folder with the full corpus; the held-out 1/3 are searched over the full 11,000-passage corpus
(nDCG@10) and nothing trains on them. Arms, each with the same wall-clock budget ``--minutes``:

- base: packaged all-MiniLM-L6-v2;
- st: sentence-transformers' SentenceTransformerTrainer, MultipleNegativesRankingLoss (scale 20),
  no-duplicates batches of 32, lr 5e-5, 10 % warm-up, the same labelled pairs; its steps fill the
  budget (measured step time) up to 3 epochs, the cap adapt uses;
- adapt-supervised: `embforge adapt` on the BEIR folder (labelled pairs + pseudo-queries);
- adapt-corpus: `embforge adapt` on the corpus alone.

General quality: STS Benchmark dev (cosine Spearman), which no arm trains on. Table, plot
(``OUT/adapt.png``) and a JSON last line with ``margin_vs_st``, ``corpus_only_gain`` and ``sts_drop``.

    python bench/adapt.py [--minutes 30] [--out runs/bench_adapt]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MLQ = SHARED / "mlquestions_dev"
STS = SHARED / "stsbenchmark"


def write_folders(out: Path) -> tuple[Path, Path, Path]:
    """(supervised BEIR folder, corpus-only folder, held-out test folder)."""
    from embforge.data.io import load_beir

    corpus, queries, qrels = load_beir(MLQ, "dev")
    ordered = sorted(queries, key=lambda q: int(q[1:]))
    held = [q for q in ordered if int(q[1:]) % 3 == 0]
    train = [q for q in ordered if int(q[1:]) % 3 != 0]
    folders = {name: out / name for name in ("supervised", "corpus", "test")}
    for folder in folders.values():
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        shutil.copy(MLQ / "corpus.jsonl", folder / "corpus.jsonl")
    for name, chosen, split in (("supervised", train, "train"), ("test", held, "test")):
        with (folders[name] / "queries.jsonl").open("w") as f:
            for q in chosen:
                f.write(json.dumps({"_id": q, "text": queries[q]}) + "\n")
        with (folders[name] / "qrels" / f"{split}.tsv").open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in chosen:
                for doc, grade in qrels[q].items():
                    f.write(f"{q}\t{doc}\t{grade}\n")
    shutil.rmtree(folders["corpus"] / "qrels")
    return folders["supervised"], folders["corpus"], folders["test"]


def scores(model, test: Path) -> dict[str, float]:
    from embforge.eval.task_config import TaskConfig
    from embforge.eval.tasks import evaluate_task

    retrieval = TaskConfig(name="MLQuestions-heldout", type="retrieval", path=str(test), split="test")
    sts = TaskConfig(name="STSB-dev", type="sts", path=str(STS / "dev.jsonl"), split="dev")
    r = evaluate_task(model, retrieval, Path("."), batch_size=64)["scores"]["test"][0]
    s = evaluate_task(model, sts, Path("."), batch_size=64)["scores"]["dev"][0]
    return {"ndcg_at_10": 100 * r["ndcg_at_10"], "sts_spearman": 100 * s["cosine_spearman"]}


def st_arm(supervised: Path, out: Path, minutes: float) -> tuple[Path, dict]:
    """sentence-transformers' trainer on the labelled pairs, its steps filling ``minutes``."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    from embforge.data.io import load_beir
    from embforge.models.registry import resolve_model_path

    corpus, queries, qrels = load_beir(supervised, "train")
    pairs = [{"anchor": queries[q], "positive": corpus[d]} for q in qrels for d, g in qrels[q].items() if g > 0]
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and "bf16" in open("/proc/cpuinfo").read()
    start = time.perf_counter()

    def train(steps: int, folder: Path, deadline: float | None):
        model = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if deadline is not None and time.perf_counter() > deadline:
                    control.should_training_stop = True

        args = SentenceTransformerTrainingArguments(
            output_dir=str(folder / "tmp"),
            per_device_train_batch_size=32,
            max_steps=steps,
            learning_rate=5e-5,
            warmup_ratio=0.1,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            logging_steps=10_000,
            seed=0,
            use_cpu=True,
            bf16=bf16,
            disable_tqdm=False,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(pairs),
            loss=MultipleNegativesRankingLoss(model, scale=20.0),
            callbacks=[Stop()],
        )
        t = time.perf_counter()
        trainer.train()
        return model, trainer.state.global_step, time.perf_counter() - t

    _, probe_steps, probe_s = train(6, out / "st-probe", None)  # the step time, counted in the budget
    step_s = probe_s / probe_steps
    left = minutes * 60 - (time.perf_counter() - start)
    cap = int(3 * len(pairs) / 32)
    steps = int(max(10, min(cap, left / step_s)))
    model, done, train_s = train(steps, out / "st", time.perf_counter() + left)
    model.save(str(out / "st" / "final"))
    return out / "st" / "final", {
        "steps": done,
        "planned_steps": steps,
        "step_s": step_s,
        "train_s": train_s,
        "bf16": bf16,
        "pairs": len(pairs),
        "wall_s": time.perf_counter() - start,
    }


def adapt_arm(folder: Path, out: Path, minutes: float) -> tuple[Path, dict]:
    from embforge.adapt.pipeline import AdaptSettings, adapt

    start = time.perf_counter()
    report = adapt(AdaptSettings(model="all-MiniLM-L6-v2", data=str(folder), minutes=minutes), out)
    return out / "final", {**report, "wall_s": time.perf_counter() - start}


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [rows[n]["ndcg_at_10"] for n in names], color="tab:blue")
    a.set_ylabel("held-out MLQuestions nDCG@10")
    a.set_ylim(min(r["ndcg_at_10"] for r in rows.values()) - 3, max(r["ndcg_at_10"] for r in rows.values()) + 2)
    b.bar(names, [rows[n]["sts_spearman"] for n in names], color="tab:orange")
    b.set_ylabel("STS Benchmark dev Spearman")
    b.set_ylim(min(r["sts_spearman"] for r in rows.values()) - 2, max(r["sts_spearman"] for r in rows.values()) + 1)
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_adapt")
    parser.add_argument("--minutes", type=float, default=30.0, help="each training arm's wall-clock budget")
    parser.add_argument("--arms", default="base,adapt-supervised,adapt-corpus,st")
    args = parser.parse_args()
    if not MLQ.is_dir() or not STS.is_dir():
        sys.exit(f"needs {MLQ} and {STS}")
    import torch

    from embforge.models.embedder import Embedder

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # the benchmark owns its folder: always fresh runs
    supervised, corpus_only, test = write_folders(out / "data")
    rows: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for arm in args.arms.split(","):
        print(f"== {arm}", flush=True)
        if arm == "base":
            model_dir, info = "all-MiniLM-L6-v2", {}
        elif arm == "st":
            model_dir, info = st_arm(supervised, out / "st", args.minutes)
        elif arm == "adapt-supervised":
            model_dir, info = adapt_arm(supervised, out / "adapt-supervised", args.minutes)
        elif arm == "adapt-corpus":
            model_dir, info = adapt_arm(corpus_only, out / "adapt-corpus", args.minutes)
        else:
            sys.exit(f"unknown arm {arm!r}")
        rows[arm] = scores(Embedder.load(model_dir, device="cpu"), test)
        details[arm] = info
        print(f"{arm}: {rows[arm]} ({info.get('wall_s', 0):.0f} s)", flush=True)

    print(
        f"\nCPU: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, budget {args.minutes} min"
    )
    print("| arm | MLQuestions held-out nDCG@10 | STSB dev Spearman | wall s |")
    print("|---|---|---|---|")
    for arm, r in rows.items():
        print(f"| {arm} | {r['ndcg_at_10']:.2f} | {r['sts_spearman']:.2f} | {details[arm].get('wall_s', 0):.0f} |")
    plot(rows, out / "adapt.png")
    (out / "details.json").write_text(json.dumps({"rows": rows, "details": details}, indent=1, default=str))

    def get(arm, key):
        return rows[arm][key] if arm in rows else math.nan

    adapts = [a for a in ("adapt-supervised", "adapt-corpus") if a in rows]
    summary = {
        "margin_vs_st": get("adapt-supervised", "ndcg_at_10") - get("st", "ndcg_at_10"),
        "corpus_only_gain": get("adapt-corpus", "ndcg_at_10") - get("base", "ndcg_at_10"),
        "sts_drop": get("base", "sts_spearman") - min((get(a, "sts_spearman") for a in adapts), default=math.nan),
        "minutes": args.minutes,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "scores": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
