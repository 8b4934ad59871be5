"""Hard-negative mining: embforge vs sentence-transformers' ``mine_hard_negatives``.

Corpus: ≥100k distinct real texts from ../shared/data (passages, sentences, tweets,
reviews, entity abstracts, Wikipedia lines). Queries: real (sentence, related sentence)
pairs from the STS / NLI / paraphrase / QA sets, whose positives are in the corpus.
Both mine 3 negatives from ranks < 50 with the packaged MiniLM as teacher, dropping
candidates above 95% of the positive's score (sentence-transformers:
``relative_margin=0.05``), exact FAISS search for both. Every run is its own process
(wall time and peak RSS are that run's), alternating the two tools, at 10k and at 40k
queries: embforge's peak RSS should not grow with the number of queries.

    python bench/mine.py           # 100k+ documents, 10k and 40k queries
    python bench/mine.py --quick   # 5k documents, 500 and 2,000 queries (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _worker import peak_rss_mb, run_worker

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NUM_NEGATIVES, RANGE_MAX, RATIO = 3, 50, 0.95


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def real_pairs() -> list[tuple[str, str]]:
    """(query, positive) pairs of related real sentences/passages."""
    pairs = []
    for r in _jsonl(SHARED / "snli" / "pairs_dev.jsonl"):
        pairs.append((r["premise"], r["hypothesis"]))
    for r in _jsonl(SHARED / "snli" / "pairs_test.jsonl"):
        pairs.append((r["premise"], r["hypothesis"]))
    for r in _jsonl(SHARED / "sick" / "sick.jsonl"):
        pairs.append((r["sentence1"], r["sentence2"]))
    for name in ("sts12_test", "sts12_train", "sts13_test", "sts14_test", "sts15_test", "sts16_test"):
        for r in _jsonl(SHARED / "semeval_sts" / f"{name}.jsonl"):
            pairs.append((r["sentence1"], r["sentence2"]))
    for split in ("train", "dev"):
        for r in _jsonl(SHARED / "stsbenchmark" / f"{split}.jsonl"):
            pairs.append((r["sentence1"], r["sentence2"]))
    for split in ("train", "validation", "test"):
        for r in _jsonl(SHARED / "mrpc" / f"{split}.jsonl"):
            pairs.append((r["sentence1"], r["sentence2"].strip()))
    for r in _jsonl(SHARED / "nq_question_passage_pairs" / "pairs.jsonl"):
        pairs.append((r["query"], r["positive"]))
    seen, out = set(), []
    for q, p in pairs:
        if q.strip() and p.strip() and q != p and (q, p) not in seen:
            seen.add((q, p))
            out.append((q, p))
    return out


def real_corpus(pairs: list[tuple[str, str]]) -> list[str]:
    """The pairs' positives first, then other real texts, deduplicated."""
    texts = [p for _, p in pairs]
    for r in _jsonl(SHARED / "mlquestions_dev" / "corpus.jsonl"):
        texts.append(r["text"])
    for r in _jsonl(SHARED / "dbpedia_entity_subset" / "corpus.jsonl"):
        texts.append((r.get("title", "") + " " + r["text"]).strip())
    for name in (
        "tweet_sentiment_extraction/train",
        "tweet_sentiment_extraction/test",
        "emotion/train",
        "emotion/validation",
        "emotion/test",
        "amazon_counterfactual/en-ext_train",
        "amazon_counterfactual/en_train",
    ):
        texts += [r["text"] for r in _jsonl(SHARED / f"{name}.jsonl")]
    for split in ("train", "dev", "test"):
        texts += [r["answer"] for r in _jsonl(SHARED / "trecqa_answer_selection" / f"{split}.jsonl")]
    texts += [q for q, _ in pairs]
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        for line in (SHARED / "wikitext2" / name).open(encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("="):
                texts += [s.strip() + " ." for s in line.split(" . ") if len(s.split()) >= 5]
    return list(dict.fromkeys(t for t in texts if t.strip()))


def worker(tool: str, n_queries: int, n_docs: int, workdir: Path) -> dict:
    pairs = real_pairs()[:n_queries]
    corpus = real_corpus(real_pairs())[:n_docs]
    assert len(corpus) == n_docs and len(pairs) == n_queries, (len(corpus), len(pairs))
    start = time.perf_counter()
    if tool == "embforge":
        from embforge.data.mining import MiningConfig, mine_file
        from embforge.models.embedder import Embedder

        inp, out = workdir / f"in-{n_queries}.jsonl", workdir / f"out-{n_queries}.jsonl"
        with inp.open("w") as f:
            for q, p in pairs:
                f.write(json.dumps({"query": q, "positive": p}) + "\n")
        teacher = Embedder.load("all-MiniLM-L6-v2", device="cpu")
        cfg = MiningConfig(
            num_negatives=NUM_NEGATIVES, range_max=RANGE_MAX, max_score_ratio=RATIO, chunk_size=2048, batch_size=64
        )
        summary = mine_file(teacher, inp, out, cfg, corpus=corpus, keep_incomplete=True)
        mined = summary["records"]["records written"]
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.util import mine_hard_negatives

        from embforge.models.registry import resolve_model_path

        model = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
        ds = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
        result = mine_hard_negatives(
            ds,
            model,
            corpus=corpus,
            range_max=RANGE_MAX,
            relative_margin=1 - RATIO,
            num_negatives=NUM_NEGATIVES,
            sampling_strategy="top",
            batch_size=64,
            use_faiss=True,
            output_format="n-tuple",
            verbose=False,
        )
        mined = len(result)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "records": mined}


def run(tool: str, n_queries: int, n_docs: int, threads: int, workdir: Path) -> dict:
    args = ["--worker", tool, "--queries", str(n_queries), "--docs", str(n_docs), "--workdir", str(workdir)]
    return run_worker(__file__, args, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["embforge", "reference"])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(
            args.threads if "OMP_NUM_THREADS" not in os.environ else int(os.environ["OMP_NUM_THREADS"])
        )
        print(json.dumps(worker(args.worker, args.queries, args.docs, Path(args.workdir))))
        return
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED}")
    n_docs, sizes = (5_000, [500, 2_000]) if args.quick else (args.docs, [args.queries, 4 * args.queries])
    available = len(real_corpus(real_pairs()))
    print(f"real texts available: {available:,} distinct; real pairs: {len(real_pairs()):,}", file=sys.stderr)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, n in enumerate(sizes):
            for tool in ["embforge", "reference"] if i % 2 == 0 else ["reference", "embforge"]:
                results[tool, n] = run(tool, n, n_docs, args.threads, Path(tmp))
                print(f"{tool} {n} queries: {results[tool, n]}", file=sys.stderr)
    print(
        f"{n_docs:,} documents, {args.threads} threads; teacher all-MiniLM-L6-v2; {NUM_NEGATIVES} negatives, ranks < {RANGE_MAX}, "
        f"drop > {RATIO} x positive score"
    )
    for n in sizes:
        e, r = results["embforge", n], results["reference", n]
        print(
            f"{n:>6} queries: embforge {e['seconds']:.1f} s / {e['peak_rss_mb']:.0f} MB, sentence-transformers "
            f"{r['seconds']:.1f} s / {r['peak_rss_mb']:.0f} MB, speed-up {r['seconds'] / e['seconds']:.2f}x"
        )
    small, big = sizes
    print(
        json.dumps(
            {
                "bench": "mine",
                "docs": n_docs,
                "queries": sizes,
                "unit": "s",
                "embforge": [round(results["embforge", n]["seconds"], 1) for n in sizes],
                "reference": [round(results["reference", n]["seconds"], 1) for n in sizes],
                "ratio": round(results["reference", small]["seconds"] / results["embforge", small]["seconds"], 3),
                "embforge_rss_mb": [round(results["embforge", n]["peak_rss_mb"]) for n in sizes],
                "reference_rss_mb": [round(results["reference", n]["peak_rss_mb"]) for n in sizes],
                "embforge_rss_growth": round(
                    results["embforge", big]["peak_rss_mb"] / results["embforge", small]["peak_rss_mb"], 3
                ),
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
