"""Encoding throughput: embforge vs sentence-transformers, same model, texts and threads.

Runs both on the same real texts (MLQuestions passages and SICK sentences from
../shared/data, or stdlib docstrings where that is absent), alternating embforge and the
reference for several repetitions, and reports the median texts/s of each and their
ratio. The last line is one JSON object.

embforge runs twice: its default path (``precision: auto``, which is bf16 autocast on CPUs
that run bf16 natively and fp32 elsewhere) gives ``ratio``, and the same path forced to fp32
gives ``ratio_fp32`` (matched precision: sentence-transformers runs fp32). ``cos`` and
``min_cos`` are the default path's cosines to sentence-transformers' embeddings.

It also runs the ONNX Runtime int8 path (``embforge export onnx --int8``, exported once
into the work directory) on the same texts and threads: ``ratio_int8`` is its texts/s over
sentence-transformers', ``cos_int8`` the mean cosine of its embeddings to
sentence-transformers' (``min_cos_int8`` the worst text), and ``ndcg10_change_int8`` the
change of nDCG@10 (x100) on the shared MLQuestions dev set, int8 minus the PyTorch fp32 path
(``ndcg10_change`` likewise for the default path). The ``*_int8_ffn_down`` keys are the same
for the int8 model exported with ``--int8-ffn-down`` (feed-forward down-projections int8 too).

    python bench/encode.py            # 2,000 texts, 5 repetitions, + MLQuestions nDCG@10
    python bench/encode.py --quick    # 200 texts, 1 repetition, no nDCG (CI)
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

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def mlquestions_ndcg(model) -> float | None:
    """nDCG@10 (x100) of ``model`` on the shared MLQuestions dev set, or None where it is absent."""
    if not (SHARED / "mlquestions_dev").is_dir():
        return None
    from embforge.eval.runner import load_suite, main_scores, run_suite

    suite, root = load_suite(REPO / "tasks" / "shared_mteb.yaml", data_root=SHARED)
    return main_scores(run_suite(model, suite, root, only=["MLQuestions"]))["MLQuestions"]


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
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_encode"))
    args = parser.parse_args()
    if args.quick:
        args.texts, args.repeats = 200, 1
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from embforge.models.embedder import Embedder
    from embforge.onnx.export import export_onnx
    from embforge.onnx.runtime import OnnxEmbedder

    texts, source = real_texts(args.texts)
    ours = Embedder.load("all-MiniLM-L6-v2", device="cpu")
    ref = SentenceTransformer(str(ours.backbone.name_or_path), device="cpu")
    onnx_dir = Path(args.work_dir) / "minilm-onnx"
    if not (onnx_dir / "model_int8.onnx").is_file():
        print("exporting MiniLM to ONNX + int8 (once)...", file=sys.stderr)
        export_onnx(ours, onnx_dir, quantize=True, source="all-MiniLM-L6-v2")
    ffn_dir = Path(args.work_dir) / "minilm-onnx-ffn-down"
    if not (ffn_dir / "model_int8.onnx").is_file():
        export_onnx(ours, ffn_dir, quantize=True, quantize_ffn_down=True, source="all-MiniLM-L6-v2")
    int8 = OnnxEmbedder(onnx_dir, quantized=True, num_threads=args.threads)
    int8_ffn = OnnxEmbedder(ffn_dir, quantized=True, num_threads=args.threads)
    runners = {
        "embforge": lambda: ours.encode(texts, batch_size=args.batch_size, show_progress=False),
        "embforge_fp32": lambda: ours.encode(texts, batch_size=args.batch_size, show_progress=False, precision="fp32"),
        "reference": lambda: ref.encode(
            texts, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True
        ),
        "onnx_int8": lambda: int8.encode(texts, batch_size=args.batch_size, show_progress=False),
        "onnx_int8_ffn_down": lambda: int8_ffn.encode(texts, batch_size=args.batch_size, show_progress=False),
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

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    cos = cosines(outputs["embforge"], outputs["reference"])
    cos_fp32 = cosines(outputs["embforge_fp32"], outputs["reference"])
    cos_int8 = cosines(outputs["onnx_int8"], outputs["reference"])
    cos_ffn = cosines(outputs["onnx_int8_ffn_down"], outputs["reference"])
    ours_tps = len(texts) / statistics.median(times["embforge"])
    fp32_tps = len(texts) / statistics.median(times["embforge_fp32"])
    ref_tps = len(texts) / statistics.median(times["reference"])
    int8_tps = len(texts) / statistics.median(times["onnx_int8"])
    ffn_tps = len(texts) / statistics.median(times["onnx_int8_ffn_down"])
    precision = ours.inference_precision
    ndcg = ndcg_fp32 = ndcg_int8 = ndcg_ffn = None
    if not args.quick:
        ndcg, ndcg_int8, ndcg_ffn = mlquestions_ndcg(ours), mlquestions_ndcg(int8), mlquestions_ndcg(int8_ffn)
        ours.precision = "fp32"
        ndcg_fp32 = mlquestions_ndcg(ours)
    print(f"{len(texts)} texts ({source}), batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(
        f"embforge default ({precision}) {ours_tps:.1f} texts/s, sentence-transformers (fp32) {ref_tps:.1f} texts/s, "
        f"ratio {ours_tps / ref_tps:.2f}, cosine to sentence-transformers mean {cos.mean():.6f} min {cos.min():.6f}"
    )
    print(f"embforge fp32 {fp32_tps:.1f} texts/s, ratio at matched precision {fp32_tps / ref_tps:.2f}")
    print(
        f"ONNX int8 {int8_tps:.1f} texts/s, ratio {int8_tps / ref_tps:.2f}, "
        f"cosine to sentence-transformers mean {cos_int8.mean():.5f} min {cos_int8.min():.5f}"
    )
    print(
        f"ONNX int8 --int8-ffn-down {ffn_tps:.1f} texts/s, ratio {ffn_tps / ref_tps:.2f}, "
        f"cosine to sentence-transformers mean {cos_ffn.mean():.5f} min {cos_ffn.min():.5f}"
    )
    if ndcg is not None:
        print(
            f"MLQuestions nDCG@10: PyTorch fp32 {ndcg_fp32:.2f}, default ({precision}) {ndcg:.2f} "
            f"({ndcg - ndcg_fp32:+.2f}), ONNX int8 {ndcg_int8:.2f} ({ndcg_int8 - ndcg_fp32:+.2f}), "
            f"int8 --int8-ffn-down {ndcg_ffn:.2f} ({ndcg_ffn - ndcg_fp32:+.2f})"
        )
    print(
        json.dumps(
            {
                "bench": "encode",
                "embforge": round(ours_tps, 1),
                "reference": round(ref_tps, 1),
                "unit": "texts/s",
                "ratio": round(ours_tps / ref_tps, 3),
                "precision": precision,
                "cos": round(float(cos.mean()), 6),
                "min_cos": round(float(cos.min()), 6),
                "embforge_fp32": round(fp32_tps, 1),
                "ratio_fp32": round(fp32_tps / ref_tps, 3),
                "max_abs_cos_diff_fp32": float(np.abs(1 - cos_fp32).max()),
                "onnx_int8": round(int8_tps, 1),
                "ratio_int8": round(int8_tps / ref_tps, 3),
                "cos_int8": round(float(cos_int8.mean()), 5),
                "min_cos_int8": round(float(cos_int8.min()), 5),
                "ndcg10_fp32": None if ndcg is None else round(ndcg_fp32, 2),
                "ndcg10": None if ndcg is None else round(ndcg, 2),
                "ndcg10_int8": None if ndcg_int8 is None else round(ndcg_int8, 2),
                "ndcg10_change": None if ndcg is None else round(ndcg - ndcg_fp32, 2),
                "ndcg10_change_int8": None if ndcg is None else round(ndcg_int8 - ndcg_fp32, 2),
                "onnx_int8_ffn_down": round(ffn_tps, 1),
                "ratio_int8_ffn_down": round(ffn_tps / ref_tps, 3),
                "cos_int8_ffn_down": round(float(cos_ffn.mean()), 5),
                "min_cos_int8_ffn_down": round(float(cos_ffn.min()), 5),
                "ndcg10_change_int8_ffn_down": None if ndcg is None else round(ndcg_ffn - ndcg_fp32, 2),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "texts": len(texts),
                "threads": args.threads,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
