"""Encoding throughput: embforge vs sentence-transformers, same model, texts and threads.

Runs both on the same real texts (MLQuestions passages and SICK sentences from
../shared/data, or stdlib docstrings where that is absent), alternating embforge and the
reference for several repetitions, and reports the median texts/s of each and their
ratio. The last line is one JSON object.

    python bench/encode.py            # 2,000 texts, 5 repetitions
    python bench/encode.py --quick    # 200 texts, 1 repetition (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_texts(n: int) -> tuple[list[str], str]:
    """n real texts: half long passages, half short sentences when ../shared/data exists."""
    if (SHARED / "mlquestions_dev" / "corpus.jsonl").is_file():
        passages = [json.loads(line)["text"] for line in (SHARED / "mlquestions_dev" / "corpus.jsonl").open()]
        sentences = [json.loads(line)["sentence1"] for line in (SHARED / "sick" / "sick.jsonl").open()]
        return passages[: n // 2] + sentences[: n - n // 2], "shared: mlquestions_dev corpus + sick sentences"
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    texts = [p.query for p in pairs] + [p.positive for p in pairs]
    return texts[:n], "stdlib docstrings and code (../shared/data absent)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.quick:
        args.texts, args.repeats = 200, 1
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from embforge.models.embedder import Embedder

    texts, source = real_texts(args.texts)
    ours = Embedder.load("all-MiniLM-L6-v2", device="cpu")
    ref = SentenceTransformer(str(ours.backbone.name_or_path), device="cpu")
    runners = {
        "embforge": lambda: ours.encode(texts, batch_size=args.batch_size, show_progress=False),
        "reference": lambda: ref.encode(
            texts, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True
        ),
    }
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.repeats):
        for name in list(runners) if rep % 2 == 0 else list(runners)[::-1]:  # alternate the order
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
        print(
            f"rep {rep + 1}/{args.repeats}: "
            + ", ".join(f"{n} {len(texts) / t[-1]:.1f} texts/s" for n, t in times.items()),
            file=sys.stderr,
        )
    a, b = outputs["embforge"], outputs["reference"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    ours_tps = len(texts) / statistics.median(times["embforge"])
    ref_tps = len(texts) / statistics.median(times["reference"])
    print(f"{len(texts)} texts ({source}), batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(
        f"embforge {ours_tps:.1f} texts/s, sentence-transformers {ref_tps:.1f} texts/s, ratio {ours_tps / ref_tps:.2f}"
    )
    print(
        json.dumps(
            {
                "bench": "encode",
                "embforge": round(ours_tps, 1),
                "reference": round(ref_tps, 1),
                "unit": "texts/s",
                "ratio": round(ours_tps / ref_tps, 3),
                "max_abs_cos_diff": float(np.abs(1 - cos).max()),
                "texts": len(texts),
                "threads": args.threads,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
