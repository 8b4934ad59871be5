"""Training throughput and memory: embforge vs sentence-transformers' trainer.

Both fine-tune the packaged all-MiniLM-L6-v2 on the same real (query, positive) pairs
(Natural Questions pairs from ../shared/data, else stdlib docstring/code pairs) with
in-batch negatives (sentence-transformers: MultipleNegativesRankingLoss), batch 32, max
length 128, same learning rate and thread count. Every measurement runs in its own
subprocess (so peak RSS is that run's own), alternating embforge and the reference, and
samples/s is measured after a warm-up step. Both frameworks run at matched precision,
fp32 and bf16 autocast; bf16 is skipped (with the reason printed) on CPUs without native
bf16, where autocast is emulated and many times slower. A second measurement gives
embforge's peak RSS at batch 1024 with GradCache (chunks of 32) against its batch-32 figure.

    python bench/train.py            # 3 alternating repetitions of 12 steps; batch 1024 GradCache step
    python bench/train.py --quick    # 1 repetition of 4 steps; batch 128 GradCache (CI)

The last line is JSON: ``ratio`` (each framework's default precision: embforge ``auto``,
sentence-transformers fp32), ``ratio_fp32`` and ``ratio_bf16`` (matched precision; null
where bf16 was skipped), and the CPU's ``cpu_capability``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _worker import peak_rss_mb, run_worker

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LEN = 128
LR = 2e-5


def real_pairs(n: int) -> tuple[list[dict], str]:
    nq = SHARED / "nq_question_passage_pairs" / "pairs.jsonl"
    if nq.is_file():
        rows = [json.loads(line) for line in nq.open()]
        return [{"query": r["query"], "positive": r["positive"]} for r in rows[:n]], "shared: nq_question_passage_pairs"
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    return [{"query": p.query, "positive": p.positive} for p in pairs[:n]], "stdlib docstring -> code pairs"


def worker_embforge(pairs: list[dict], batch: int, steps: int, chunk: int, precision: str) -> dict:
    from embforge.config import from_dict
    from embforge.models.embedder import Embedder
    from embforge.train.contrastive import train_stage
    from embforge.train.parallel import DistInfo
    from embforge.train.recipe import StageConfig

    tmp = Path(tempfile.mkdtemp())
    with (tmp / "pairs.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    model = Embedder.load("all-MiniLM-L6-v2", device="cpu", max_seq_len=MAX_LEN)
    stage = from_dict(
        StageConfig,
        {
            "name": "bench",
            "steps": steps,
            "log_every": 1,
            "grad_cache_chunk": chunk,
            "precision": precision,
            "data": {
                "batch_size": batch,
                "no_duplicates": False,
                "datasets": [{"name": "pairs", "path": "pairs.jsonl"}],
            },
            "loss": {"temperature": 0.05},
            "optim": {"lr": LR, "weight_decay": 0.01, "max_grad_norm": 1.0},
        },
    )
    history = train_stage(
        model, stage, data_root=tmp, stage_dir=tmp / "run", recipe_dict={}, info=DistInfo(), seed=0, resume=False
    )
    rates = [h["examples_per_s"] for h in history[1:]] or [history[0]["examples_per_s"]]  # skip the warm-up step
    return {"samples_per_s": len(rates) / sum(1 / r for r in rates), "peak_rss_mb": peak_rss_mb()}


def worker_reference(pairs: list[dict], batch: int, steps: int, precision: str) -> dict:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from embforge.models.registry import resolve_model_path

    model = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
    model.max_seq_length = MAX_LEN
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp()
    args = SentenceTransformerTrainingArguments(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=0.01,
        max_grad_norm=1.0,
        warmup_steps=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        seed=0,
        use_cpu=True,
        dataloader_drop_last=True,
        disable_tqdm=True,
        bf16=precision == "bf16",
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        loss=MultipleNegativesRankingLoss(model, scale=1 / 0.05),
        callbacks=[Clock()],
    )
    trainer.train()
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step is warm-up
    return {"samples_per_s": batch / statistics.mean(per_step), "peak_rss_mb": peak_rss_mb()}


def run_one(kind: str, batch: int, steps: int, chunk: int, threads: int, precision: str) -> dict:
    args = [
        "--worker",
        kind,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--chunk",
        str(chunk),
        "--precision",
        precision,
    ]
    return run_worker(__file__, args, threads)


def bf16_skip_reason() -> str | None:
    """Why bf16 configurations are skipped on this CPU, or None when it has native bf16."""
    import torch

    from embforge.precision import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f", oneDNN capped at ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}{capped} has no native bf16 (AVX512-BF16/AMX): "
        "autocast would be emulated, many times slower, and say nothing about either framework"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["embforge", "reference"])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
        pairs, _ = real_pairs(max(args.batch * args.steps, 2048))
        if args.worker == "embforge":
            result = worker_embforge(pairs, args.batch, args.steps, args.chunk, args.precision)
        else:
            result = worker_reference(pairs, args.batch, args.steps, args.precision)
        print(json.dumps(result))
        return

    import torch

    from embforge.precision import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()
    skip_bf16 = bf16_skip_reason()
    if skip_bf16:
        print(f"skipping the bf16 configurations: {skip_bf16}", file=sys.stderr)
    precisions = ["fp32"] if skip_bf16 else ["fp32", "bf16"]
    # (framework, precision), both frameworks at each precision; embforge's `auto` is one of them
    configs = [(framework, p) for p in precisions for framework in ("embforge", "reference")]
    if args.quick:
        args.repeats, args.steps, args.big_batch = 1, 4, 128
    _, source = real_pairs(8)
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for config in configs if rep % 2 == 0 else configs[::-1]:  # alternate the order
            runs[config].append(run_one(config[0], 32, args.steps, 0, args.threads, config[1]))
            print(f"rep {rep + 1}/{args.repeats} {config}: {runs[config][-1]}", file=sys.stderr)
    big = run_one("embforge", args.big_batch, 2, 32, args.threads, "auto")

    def med(config, key="samples_per_s"):
        return statistics.median(r[key] for r in runs[config])

    ratios = {p: med(("embforge", p)) / med(("reference", p)) for p in precisions}
    ours, ref = med(("embforge", auto)), med(("reference", "fp32"))
    rss32 = med(("embforge", auto), "peak_rss_mb")
    print(
        f"pairs: {source}; batch 32, max length {MAX_LEN}, {args.threads} threads, CPU capability {capability}, "
        f"median of {args.repeats}"
    )
    for p in precisions:
        print(
            f"{p}: embforge {med(('embforge', p)):.2f} vs sentence-transformers trainer + MNRL "
            f"{med(('reference', p)):.2f} samples/s: ratio {ratios[p]:.2f}"
        )
    if skip_bf16:
        print(f"bf16: skipped ({skip_bf16})")
    print(f"defaults (embforge auto -> {auto}, sentence-transformers fp32): ratio {ours / ref:.2f}")
    print(
        f"peak RSS: batch 32 {rss32:.0f} MB; batch {args.big_batch} with GradCache (chunk 32) {big['peak_rss_mb']:.0f} MB "
        f"({big['peak_rss_mb'] / rss32:.2f}x); reference batch 32 {med(('reference', 'fp32'), 'peak_rss_mb'):.0f} MB"
    )
    print(
        json.dumps(
            {
                "bench": "train",
                "embforge": round(ours, 2),
                "reference": round(ref, 2),
                "unit": "samples/s",
                "ratio": round(ours / ref, 3),
                "ratio_fp32": round(ratios["fp32"], 3),
                "ratio_bf16": round(ratios["bf16"], 3) if "bf16" in ratios else None,
                "bf16_skipped": skip_bf16,
                "embforge_precision": auto,
                "cpu_capability": capability,
                "rss_batch32_mb": round(rss32),
                "big_batch": args.big_batch,
                "rss_big_batch_gradcache_mb": round(big["peak_rss_mb"]),
                "rss_ratio": round(big["peak_rss_mb"] / rss32, 3),
                "threads": args.threads,
                "repeats": args.repeats,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
