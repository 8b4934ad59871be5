"""Encoding throughput: embforge's paths vs sentence-transformers, same model, texts and threads.

Runs every path on the same real texts (MLQuestions passages and SICK sentences from
../shared/data, or stdlib docstrings where that is absent), alternating the order each
repetition, and reports the median texts/s of each and its ratio to sentence-transformers fp32
(the reference). The paths:

- ``embforge``: the PyTorch default (``precision: auto``: bf16 autocast on CPUs that run bf16
  natively, fp32 elsewhere) -> ``ratio``; ``embforge_fp32``: the same forced to fp32 (matched
  precision) -> ``ratio_fp32``;
- ``onnx_fp32``: ONNX Runtime, ``model.onnx``;
- ``onnx_int8``: ONNX Runtime, ``embforge export onnx --int8`` (dynamic int8, the feed-forward
  down-projections kept fp32) -> ``ratio_int8``; ``onnx_int8_ffn_down``: ``--int8-ffn-down``
  (every weight MatMul int8) -> ``ratio_int8_ffn_down``; ``onnx_int8_unchunked``: ``onnx_int8``
  with each batch run whole on ONNX Runtime's intra-op threads instead of one chunk per core
  (``chunked=False``: the A/B of the chunked runners);
- ``openvino_fp32``: OpenVINO running ``model.onnx``; ``openvino_int8``: ``--int8 --openvino``
  (NNCF static int8, calibrated on 300 other texts of the same sources) -> ``ratio_openvino_int8``
  (skipped with a reason where ``openvino``/``nncf`` are not installed).

Quality of each path: mean and worst cosine to sentence-transformers' embeddings, and (not with
``--quick``) the change of nDCG@10 (x100) on the shared MLQuestions dev set against the PyTorch
fp32 path. A quantised path *meets the bars* with mean cosine >= 0.99 and an nDCG@10 change within
0.5 (the cosine alone with ``--quick``); ``ratio_best_quantised`` is the texts/s of the fastest one
that does over the reference's, ``best_quantised`` its name. The CPU's capability and its
SIMD flags are printed and in the JSON (speed depends on them: int8 gains most with VNNI).

    python bench/encode.py            # 2,000 texts, 5 repetitions, + MLQuestions nDCG@10
    python bench/encode.py --quick    # 200 texts, 1 repetition, no nDCG (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
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
QUANTISED = ("onnx_int8", "onnx_int8_ffn_down", "openvino_int8")
COS_BAR, NDCG_BAR = 0.99, 0.5


def mlquestions_ndcg(model) -> float | None:
    """nDCG@10 (x100) of ``model`` on the shared MLQuestions dev set, or None where it is absent."""
    if not (SHARED / "mlquestions_dev").is_dir():
        return None
    from embforge.eval.runner import load_suite, main_scores, run_suite

    suite, root = load_suite(REPO / "tasks" / "shared_mteb.yaml", data_root=SHARED)
    return main_scores(run_suite(model, suite, root, only=["MLQuestions"]))["MLQuestions"]


def real_texts(n: int, skip: int = 0) -> tuple[list[str], str]:
    """n real texts (after the first ``skip`` of each half): half long passages, half short sentences."""
    if (SHARED / "mlquestions_dev" / "corpus.jsonl").is_file():
        passages = [json.loads(line)["text"] for line in (SHARED / "mlquestions_dev" / "corpus.jsonl").open()]
        sentences = [json.loads(line)["sentence1"] for line in (SHARED / "sick" / "sick.jsonl").open()]
        half = skip // 2
        texts = passages[half : half + n // 2] + sentences[half : half + n - n // 2]
        return texts, "shared: mlquestions_dev corpus + sick sentences"
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    texts = [p.query for p in pairs] + [p.positive for p in pairs]
    return texts[skip : skip + n], "stdlib docstrings and code (../shared/data absent)"


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that decide these paths' speed (Linux /proc/cpuinfo)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    return [f for f in wanted if f in flags]


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
    from embforge.onnx.runtime import OnnxEmbedder, is_current_export

    texts, source = real_texts(args.texts)
    ours = Embedder.load("all-MiniLM-L6-v2", device="cpu")
    ref = SentenceTransformer(str(ours.backbone.name_or_path), device="cpu")
    has_openvino = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
    work = Path(args.work_dir)
    onnx_dir, ffn_dir = work / "minilm-onnx", work / "minilm-onnx-ffn-down"
    if not is_current_export(onnx_dir) or (has_openvino and not (onnx_dir / "openvino_int8.xml").is_file()):
        print("exporting MiniLM to ONNX + int8 (once)...", file=sys.stderr)
        calibration, _ = real_texts(300, skip=args.texts)  # not the timed texts
        export_onnx(ours, onnx_dir, quantize=True, openvino=has_openvino, calibration_texts=calibration,
                    source="all-MiniLM-L6-v2")  # fmt: skip
    if not is_current_export(ffn_dir):
        export_onnx(ours, ffn_dir, quantize=True, quantize_ffn_down=True, source="all-MiniLM-L6-v2")
    models = {
        "embforge": ours,
        "embforge_fp32": Embedder.load("all-MiniLM-L6-v2", device="cpu", precision="fp32"),
        "onnx_fp32": OnnxEmbedder(onnx_dir, num_threads=args.threads),
        "onnx_int8": OnnxEmbedder(onnx_dir, quantized=True, num_threads=args.threads),
        "onnx_int8_ffn_down": OnnxEmbedder(ffn_dir, quantized=True, num_threads=args.threads),
        # A/B of the chunked runners: each batch whole, on ONNX Runtime's own intra-op threads
        "onnx_int8_unchunked": OnnxEmbedder(onnx_dir, quantized=True, num_threads=args.threads, chunked=False),
    }
    if has_openvino:
        models["openvino_fp32"] = OnnxEmbedder(onnx_dir, num_threads=args.threads, runtime="openvino")
        models["openvino_int8"] = OnnxEmbedder(onnx_dir, quantized=True, num_threads=args.threads, runtime="openvino")
    else:
        print("openvino paths skipped: `pip install 'embforge[openvino]'` (openvino, nncf)", file=sys.stderr)
    runners = {name: (lambda m=m: m.encode(texts, batch_size=args.batch_size, show_progress=False))
               for name, m in models.items()}  # fmt: skip
    runners["reference"] = lambda: ref.encode(
        texts, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True
    )
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

    tps = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    ref_tps = tps["reference"]
    cos = {name: cosines(outputs[name], outputs["reference"]) for name in models}
    ndcg: dict[str, float | None] = {name: None for name in models}
    if not args.quick and (SHARED / "mlquestions_dev").is_dir():
        ndcg = {name: mlquestions_ndcg(m) for name, m in models.items()}
    change = {n: None if ndcg[n] is None else ndcg[n] - ndcg["embforge_fp32"] for n in models}

    def meets_bars(name: str) -> bool:
        return cos[name].mean() >= COS_BAR and (change[name] is None or abs(change[name]) <= NDCG_BAR)

    capability, flags = torch.backends.cpu.get_cpu_capability(), cpu_flags()
    print(f"{len(texts)} texts ({source}), batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(
        f"CPU: {capability}, flags {' '.join(flags) or '?'}; reference: sentence-transformers fp32 {ref_tps:.1f} texts/s"
    )
    print("| path | texts/s | ratio | mean cos | worst cos | nDCG@10 change | bars |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        delta = "" if change[name] is None else f"{change[name]:+.2f}"
        bars = ("yes" if meets_bars(name) else "no") if name in QUANTISED else ""
        print(f"| {name} | {tps[name]:.1f} | {tps[name] / ref_tps:.2f} | {cos[name].mean():.5f} | "
              f"{cos[name].min():.5f} | {delta} | {bars} |")  # fmt: skip
    passing = [n for n in QUANTISED if n in models and meets_bars(n)]
    best = max(passing, key=lambda n: tps[n], default=None)
    print(f"fastest quantised path within the bars (mean cos >= {COS_BAR}, |nDCG@10 change| <= {NDCG_BAR}): {best}")

    def r(x: float | None, digits: int) -> float | None:
        return None if x is None else round(float(x), digits)

    headline = {
        "bench": "encode",
        "embforge": r(tps["embforge"], 1),
        "reference": r(ref_tps, 1),
        "unit": "texts/s",
        "ratio": r(tps["embforge"] / ref_tps, 3),
        "precision": ours.inference_precision,
        "cos": r(cos["embforge"].mean(), 6),
        "min_cos": r(cos["embforge"].min(), 6),
        "embforge_fp32": r(tps["embforge_fp32"], 1),
        "ratio_fp32": r(tps["embforge_fp32"] / ref_tps, 3),
        "max_abs_cos_diff_fp32": float(np.abs(1 - cos["embforge_fp32"]).max()),
        "ndcg10_fp32": r(ndcg["embforge_fp32"], 2),
        "ndcg10": r(ndcg["embforge"], 2),
        "ndcg10_change": r(change["embforge"], 2),
    }
    for name in models:
        if name.startswith(("onnx", "openvino")):
            # onnx_int8 and onnx_int8_ffn_down keep the keys earlier runs printed (ratio_int8, ...)
            key = name.removeprefix("onnx_") if name.startswith("onnx_int8") else name
            headline[f"ratio_{key}"] = r(tps[name] / ref_tps, 3)
            headline[f"cos_{key}"] = r(cos[name].mean(), 5)
            headline[f"min_cos_{key}"] = r(cos[name].min(), 5)
            headline[f"ndcg10_change_{key}"] = r(change[name], 2)
    headline.update(
        {
            "onnx_int8": r(tps["onnx_int8"], 1),
            "ratio_best_quantised": None if best is None else r(tps[best] / ref_tps, 3),
            "best_quantised": best,
            "cpu_capability": capability,
            "cpu_flags": flags,
            "texts": len(texts),
            "threads": args.threads,
            "quick": args.quick,
        }
    )
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
