"""Nomic's consistency filter on real pair data from ../shared/data, per-source counts.

Builds (query, positive, source) pairs from seven shared datasets (NLI entailments, SICK
and STS-B pairs scored >= 4, MRPC paraphrases, Natural Questions, MLQuestions, TrecQA
answers), runs ``consistency_filter`` with the packaged MiniLM as teacher (top-2 within
each source) and prints kept/dropped per source. The last line is one JSON object.

    python bench/consistency.py [--top-k 2] [--chunk-pairs 1000000]
    python bench/consistency.py --quick    # the first 100 pairs of each source, in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def shared_pairs() -> list[dict]:
    rows = []
    for split in ("dev", "test"):
        rows += [
            {"query": r["premise"], "positive": r["hypothesis"], "source": "snli-entailment"}
            for r in _jsonl(SHARED / "snli" / f"pairs_{split}.jsonl")
            if r["label"] == "entailment"
        ]
    rows += [
        {"query": r["sentence1"], "positive": r["sentence2"], "source": "sick>=4"}
        for r in _jsonl(SHARED / "sick" / "sick.jsonl")
        if r["relatedness_score"] >= 4
    ]
    for split in ("train", "dev"):
        rows += [
            {"query": r["sentence1"], "positive": r["sentence2"], "source": "stsb>=4"}
            for r in _jsonl(SHARED / "stsbenchmark" / f"{split}.jsonl")
            if r["score"] >= 4
        ]
    for split in ("train", "validation", "test"):
        rows += [
            {"query": r["sentence1"], "positive": r["sentence2"].strip(), "source": "mrpc-paraphrase"}
            for r in _jsonl(SHARED / "mrpc" / f"{split}.jsonl")
            if r["label"] == 1
        ]
    rows += [
        {"query": r["query"], "positive": r["positive"], "source": "nq"}
        for r in _jsonl(SHARED / "nq_question_passage_pairs" / "pairs.jsonl")
    ]
    from embforge.data.io import load_beir

    corpus, queries, qrels = load_beir(SHARED / "mlquestions_dev", "dev")
    rows += [
        {"query": queries[q], "positive": corpus[d], "source": "mlquestions"}
        for q, ds in qrels.items()
        for d, g in ds.items()
        if g > 0
    ]
    for split in ("train", "dev", "test"):
        rows += [
            {"query": r["question"], "positive": r["answer"], "source": "trecqa"}
            for r in _jsonl(SHARED / "trecqa_answer_selection" / f"{split}.jsonl")
            if r["label"] == 1
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--chunk-pairs", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="the first 100 pairs of each source")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED}")
    from embforge.data.filtering import consistency_filter
    from embforge.models.embedder import Embedder

    rows = shared_pairs()
    if args.quick:
        taken: Counter = Counter()
        kept_rows = []
        for r in rows:
            taken[r["source"]] += 1
            if taken[r["source"]] <= 100:
                kept_rows.append(r)
        rows = kept_rows
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "pairs.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        start = time.perf_counter()
        report = consistency_filter(
            Embedder.load("all-MiniLM-L6-v2"),
            inp,
            Path(tmp) / "kept.jsonl",
            top_k=args.top_k,
            chunk_pairs=args.chunk_pairs,
        )
        seconds = time.perf_counter() - start
    print(f"{'source':<18}{'pairs':>8}{'kept':>8}{'dropped':>9}{'kept %':>8}")
    for source, r in report.items():
        total = r["kept"] + r["dropped"]
        print(f"{source:<18}{total:>8}{r['kept']:>8}{r['dropped']:>9}{100 * r['kept'] / total:>8.1f}")
    kept = sum(r["kept"] for r in report.values())
    print(
        json.dumps(
            {
                "bench": "consistency",
                "pairs": len(rows),
                "kept": kept,
                "top_k": args.top_k,
                "quick": args.quick,
                "seconds": round(seconds, 1),
                "per_source": report,
            }
        )
    )


if __name__ == "__main__":
    main()
