"""8,192-token inference on CPU: a tiny nomic-bert and the nomic-bert-2048 preset shape.

Each run embeds one real text of exactly the target length (WikiText-2 articles from
../shared/data, else stdlib source files) with ``Embedder.encode`` in its own process, so
its peak RSS is its own; the preset's weights are random (the shape is what costs memory
and time). Beyond the trained 2,048 tokens the rotary base is stretched by dynamic NTK
(factor 2). The reference is the same model at the trained length, in the same run.

    python bench/long_context.py            # tiny and preset, 2,048 and 8,192 tokens
    python bench/long_context.py --quick    # tiny only, 2,048 and 8,192 tokens (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _worker import peak_rss_mb, run_worker

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128),
    "nomic-bert-2048": {},  # the preset: 12 x 768, 12 heads, 3,072 inner
}


def long_text() -> str:
    wiki = SHARED / "wikitext2" / "wiki.test.tokens"
    if wiki.is_file():
        return wiki.read_text(encoding="utf-8")
    import inspect
    import json as module

    return inspect.getsource(module) * 20


def worker(shape: str, length: int) -> dict:
    import numpy as np
    import torch

    from embforge.modeling.head import HeadSpec
    from embforge.models.embedder import Embedder
    from embforge.models.nomic_bert import build_backbone
    from embforge.models.nomic_bert_config import from_name
    from embforge.models.tokenizers import nomic_tokenizer

    torch.manual_seed(0)
    spec = from_name("nomic-bert-2048", **SHAPES[shape])  # max_seq_len 8,192, NTK factor 2 beyond 2,048
    model = Embedder(build_backbone(spec), nomic_tokenizer(), HeadSpec(max_seq_len=spec.max_seq_len)).eval()
    ids = model.tokenize([long_text()])["input_ids"]
    assert ids.shape[1] == spec.max_seq_len, ids.shape  # the text is long enough to fill the context
    text = model.tokenizer.decode(ids[0, 1 : length - 1])  # [CLS] + body + [SEP] = length tokens
    tokens = model.tokenize([text])["input_ids"].shape[1]
    start = time.perf_counter()
    emb = model.encode([text])
    seconds = time.perf_counter() - start
    return {
        "shape": shape,
        "tokens": int(tokens),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "finite": bool(np.isfinite(emb).all()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "LENGTH"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return

    shapes = ["tiny"] if args.quick else ["tiny", "nomic-bert-2048"]
    results = {}
    for shape in shapes:
        for length in (2048, 8192):
            results[f"{shape}@{length}"] = r = run_worker(__file__, ["--worker", shape, str(length)], args.threads)
            print(f"{shape} x {r['tokens']} tokens: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"finite {r['finite']}", file=sys.stderr)  # fmt: skip
    summary = {"bench": "long_context", "threads": args.threads, "quick": args.quick}
    for shape in shapes:
        short, long = results[f"{shape}@2048"], results[f"{shape}@8192"]
        summary[shape] = {
            "tokens": long["tokens"],
            "seconds": round(long["seconds"], 2),
            "peak_rss_mb": round(long["peak_rss_mb"]),
            "finite": long["finite"],
            "seconds_2048": round(short["seconds"], 2),
            "peak_rss_mb_2048": round(short["peak_rss_mb"]),
            "rss_ratio_vs_2048": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
