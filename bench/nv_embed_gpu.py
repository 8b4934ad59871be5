"""NV-Embed at reduced depth on one GPU: tokens/s, MFU and peak memory through ``embforge train``.

Builds a Mistral-7B-shaped backbone with fewer layers (random weights: this measures speed and
memory, not quality), writes it as a model folder with a real tokenizer, and trains it with
the full-size stage-1 recipe (``recipes/nv_embed/stage1.yaml``: bidirectional attention, the
released latent-attention head 512 x 8 x 4096, LoRA r16, bf16, gradient checkpointing, batch
16 with 7 negatives, 512 tokens) through the command users run. Data: Natural Questions
(question, passage) pairs, each with 7 other passages as negatives (seeded; only their length
matters here).

- tokens/s: real (non-pad) tokens of queries and documents per second, from the training
  log, the first logging window (compilation, allocator warm-up) left out.
- MFU: FLOPs of one training step counted by ``torch.utils.flop_counter.FlopCounterMode`` on a
  batch drawn like the training batches (forward + backward, no activation recomputation:
  model FLOPs, not hardware FLOPs), per real token, times tokens/s, over the GPU's dense bf16
  peak (989 TFLOP/s for H100/H200 SXM; ``--peak-tflops`` elsewhere).
- peak memory: ``torch.cuda.max_memory_allocated`` of the training process.
- head_changed: per tensor of the latent-attention head, the fraction of its entries that the
  run changed (the initial head rebuilt with the run's seed, against the last checkpoint); with
  bf16 weights and no float32 master most stayed unchanged at LR 2e-5.
- gpu_cpu_cos: the saved model encoded on the GPU (bf16 autocast) against the same folder on the
  CPU at fp32 (min and mean cosine over 32 real queries and passages).

    python bench/nv_embed_gpu.py --tokenizer DIR --pairs nq.jsonl [--layers 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "src" / "embforge" / "recipes" / "nv_embed" / "stage1.yaml"
INSTRUCTION = "Given a question, retrieve Wikipedia passages that answer the question"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM parts


def build_backbone(folder: Path, tokenizer_dir: Path, layers: int) -> None:
    """A Mistral-7B-shaped backbone with ``layers`` layers (random init, bf16) + tokenizer in ``folder``."""
    from transformers import AutoTokenizer

    from embforge.models.presets import preset_config
    from embforge.models.saving import backbone_from_config

    if (folder / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = preset_config("mistral-7b", num_hidden_layers=layers, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = backbone_from_config(config, device="cuda", init=True).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def write_data(pairs: Path, out: Path, negatives: int, seed: int = 0) -> Path:
    rows = [json.loads(line) for line in pairs.open(encoding="utf-8")]
    rng = random.Random(seed)
    passages = [r["positive"] for r in rows]
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            negs = [p for p in rng.sample(passages, negatives + 1) if p != r["positive"]][:negatives]
            f.write(json.dumps({"query": r["query"], "positive": r["positive"], "negatives": negs}) + "\n")
    return out


def write_recipe(work: Path, backbone: Path, data: Path, steps: int, batch: int, checkpointing: bool) -> Path:
    recipe = yaml.safe_load(STAGE1.read_text())
    recipe["model"]["name_or_path"] = str(backbone)
    recipe["model"]["gradient_checkpointing"] = checkpointing
    recipe["output_dir"] = str(work / f"run_ckpt{int(checkpointing)}")
    recipe["data_root"] = str(data.parent)
    stage = recipe["stages"][0]
    stage.update(steps=steps, log_every=5, save_every=10**9)
    stage["data"]["batch_size"] = batch
    stage["data"]["datasets"] = [{"name": "nq", "path": data.name, "instruction": INSTRUCTION}]
    path = work / f"recipe_ckpt{int(checkpointing)}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def flops_per_token(recipe_path: Path, data: Path, batch: int, negatives: int, chunk: int = 2) -> tuple[float, float]:
    """(model FLOPs of one training step per real token, real tokens / padded positions).

    Counted on one batch tokenised like the training ones, without activation recomputation;
    forward + backward run ``chunk`` examples at a time (rows of the already padded batch, so
    the padding is the batch's) because without checkpointing the whole batch does not fit.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from embforge.models.build import build_embedder
    from embforge.train.recipe import load_recipe

    recipe, _ = load_recipe(recipe_path)
    recipe.model.gradient_checkpointing = False  # model FLOPs: no recomputation
    embedder = build_embedder(recipe.model, device="cuda")
    embedder.train()
    rows = [json.loads(line) for line in data.open(encoding="utf-8")][:batch]
    queries = embedder.tokenize([r["query"] for r in rows], prompt=embedder.head.instruction_prompt(INSTRUCTION))
    docs = embedder.tokenize([t for r in rows for t in [r["positive"], *r["negatives"][:negatives]]])
    real = int(queries["attention_mask"].sum() + docs["attention_mask"].sum())
    padded = queries["attention_mask"].numel() + docs["attention_mask"].numel()
    per = 1 + negatives
    with FlopCounterMode(display=False) as counter:
        for i in range(0, len(rows), chunk):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                q = embedder(**{k: v[i : i + chunk] for k, v in queries.items()})
                d = embedder(**{k: v[i * per : (i + chunk) * per] for k, v in docs.items()})
                target = torch.arange(len(q), device="cuda") * per
                loss = torch.nn.functional.cross_entropy((q @ d.T).float() / 0.02, target)
            loss.backward()
    del embedder
    torch.cuda.empty_cache()
    return counter.get_total_flops() / real, real / padded


def head_changed(recipe_path: Path) -> dict[str, float]:
    """Fraction of each trainable head tensor's entries that the run of ``recipe_path`` changed."""
    from embforge.models.build import build_embedder
    from embforge.train.checkpoint import latest_checkpoint, load_model_weights
    from embforge.train.recipe import load_recipe
    from embforge.train.stages import stage_dirs

    recipe, _ = load_recipe(recipe_path)
    start, end = [], None
    for _ in range(2):
        torch.manual_seed(recipe.seed)  # run_recipe seeds before building: the same initial head
        start.append(build_embedder(recipe.model, device="cpu"))
    start, end = start
    load_model_weights(latest_checkpoint(stage_dirs(recipe)[0] / "checkpoints"), end)  # sharded or not
    trained = dict(end.pooler.named_parameters())
    return {
        name: float((trained[name].detach() != p.detach()).float().mean())
        for name, p in start.pooler.named_parameters()
    }


def gpu_cpu_cosine(folder: Path, data: Path, n: int = 32) -> dict[str, float]:
    """Min and mean cosine between the saved model on the GPU (bf16 autocast) and on the CPU (fp32)."""
    from embforge.models.embedder import Embedder

    rows = [json.loads(line) for line in data.open(encoding="utf-8")][: n // 2]
    texts = [r["query"] for r in rows] + [r["positive"] for r in rows]
    gpu = Embedder.load(folder, device="cuda").encode(texts, precision="bf16")
    cpu = Embedder.load(folder, device="cpu").encode(texts, precision="fp32")
    cos = (gpu * cpu).sum(1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. SmolLM2's)")
    parser.add_argument("--pairs", required=True, help="JSONL of {query, positive} (shared nq_question_passage_pairs)")
    parser.add_argument("--work", default="runs/nv_embed_gpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-checkpointing", action="store_true", help="also run without gradient checkpointing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures a GPU (see bench/nv_embed_cpu.py for the CPU twin)")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        sys.exit(f"unknown peak bf16 FLOP/s for {name!r}: pass --peak-tflops")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    backbone = work / f"mistral-{args.layers}l"
    t0 = time.perf_counter()
    build_backbone(backbone, Path(args.tokenizer), args.layers)
    print(f"backbone written in {time.perf_counter() - t0:.0f} s", flush=True)
    negatives = yaml.safe_load(STAGE1.read_text())["stages"][0]["data"]["num_negatives"]
    data = write_data(Path(args.pairs), work / "nq_with_negatives.jsonl", negatives)

    results = {"device": name, "layers": args.layers, "batch": args.batch, "negatives": negatives, "runs": {}}
    for checkpointing in [True] + ([False] if args.no_checkpointing else []):
        recipe = write_recipe(work, backbone, data, args.steps, args.batch, checkpointing)
        shutil.rmtree(yaml.safe_load(recipe.read_text())["output_dir"], ignore_errors=True)  # a fresh run
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "embforge", "train", str(recipe), "--no-resume"], env=env)
        if proc.returncode != 0:  # e.g. out of memory without checkpointing: say so, keep the other rows
            results["runs"][f"checkpointing={checkpointing}"] = {"error": f"embforge train exited {proc.returncode}"}
            continue
        wall = time.perf_counter() - t0
        out = yaml.safe_load(recipe.read_text())["output_dir"]
        rows = [json.loads(line) for p in Path(out).rglob("metrics.jsonl") for line in p.open()]
        steady = rows[1:] or rows
        tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
        results["runs"][f"checkpointing={checkpointing}"] = {
            "tokens_per_s": tokens_per_s,
            "examples_per_s": sum(r["examples_per_s"] for r in steady) / len(steady),
            "peak_gib": max(r["cuda_peak_gib"] for r in rows),
            "wall_s": wall,
        }
    first = write_recipe(work, backbone, data, args.steps, args.batch, True)
    if "tokens_per_s" in results["runs"].get("checkpointing=True", {}):
        results["head_changed"] = head_changed(first)
        results["head_changed_min"] = min(results["head_changed"].values())
        results["gpu_cpu_cos"] = gpu_cpu_cosine(Path(yaml.safe_load(first.read_text())["output_dir"]) / "final", data)
    fpt, real_fraction = flops_per_token(recipe, data, args.batch, negatives)
    results["model_flops_per_token"] = fpt
    results["real_token_fraction"] = real_fraction  # of the padded positions the model computes
    for run in results["runs"].values():
        if "tokens_per_s" in run:
            run["mfu"] = fpt * run["tokens_per_s"] / peak
    (work / "results.json").write_text(json.dumps(results, indent=2))
    for key, run in results["runs"].items():
        if "error" in run:
            print(f"{key}: {run['error']}")
            continue
        print(
            f"{key}: {run['tokens_per_s']:,.0f} tokens/s, {run['examples_per_s']:.1f} queries/s, "
            f"MFU {100 * run['mfu']:.1f} %, peak {run['peak_gib']:.1f} GiB"
        )
    if "head_changed_min" in results:
        print(f"head entries changed: at least {100 * results['head_changed_min']:.1f} % of every tensor's")
        print(f"saved model, GPU bf16 vs CPU fp32: cosine min {results['gpu_cpu_cos']['min']:.5f}")
    print(json.dumps({"bench": "nv_embed_gpu", **results}))


if __name__ == "__main__":
    main()
