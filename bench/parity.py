"""One embedding everywhere: every way out of a model gives ``Embedder.encode``'s vector, whatever the batch.

Models (each built in memory, the reference, and saved with ``Embedder.save``; every path
starts from the saved folder, so what saving loses fails every cell):

- ``minilm``: the packaged all-MiniLM-L6-v2 (mean pooling), with a ``query`` prompt;
- ``minilm-instruction``: the same with an instruction prompt that is attended to but not
  pooled (an embforge folder: sentence-transformers' own Pooling would pool the prompt);
- ``nomic-ntk``: a nomic-bert (2 layers, width 64) with dynamic NTK rotary, texts beyond its
  trained length (``--quick``: trained at 64 tokens, texts to ~300; full: the preset's 2,048,
  texts to ~3,000), Nomic's task prefixes and Matryoshka layer norm;
- ``nv-decoder``: an NV-Embed-style decoder (bidirectional, latent-attention head, an
  instruction prompt attended to but not pooled, EOS, right padding), byte-level BPE;
- ``last-token``: a Qwen3-Embedding-style decoder (causal, last token = EOS, left padding,
  instruction prompt pooled);
- ``nv-adapter``: the NV-style decoder with trained-looking LoRA adapters, saved with the
  adapter kept apart (``merge_on_save: false``, how stage1.yaml hands over to stage 2).

Paths: ``Embedder.encode`` itself (batch invariance); sentence-transformers loading the folder
(``prompt_name``); plain ``transformers`` running the snippet of the folder's README.md in a
process where ``import embforge`` fails; ONNX fp32 and int8; ``embforge serve`` (float and
base64) under 8 concurrent clients sending shuffled mixed-length batches with prompts.

Pass (per cell): min cosine to ``Embedder.encode`` at fp32 >= 0.99999 (ONNX fp32 >= 0.9999; int8
mean >= 0.99 and top-10 neighbour overlap >= 90 %), and batch invariance: a text's vector does
not depend on its batch-mates or their order (max |Δ| <= 1e-5 between two batchings; the
server: between every copy of a text it returned). The last line is one JSON object with
``"ok": true`` only when every cell passes, and every cell's figures.

    python bench/parity.py            # full size (nomic beyond 2,048 tokens), every model
    python bench/parity.py --quick    # small texts and trained length (what the tests run)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_COS, ONNX_MIN_COS, INT8_MEAN_COS, INT8_TOP10, INVARIANCE = 0.99999, 0.9999, 0.99, 0.90, 1e-5
MODELS = ("minilm", "minilm-instruction", "nomic-ntk", "nv-decoder", "last-token", "nv-adapter")
PATHS = ("embedder", "sentence-transformers", "transformers", "onnx-fp32", "onnx-int8", "serve-float", "serve-base64")
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "


@dataclass
class Case:
    """A saved model, its reference embedder, the prompts to check and the texts."""

    name: str
    folder: Path
    reference: object  # the Embedder as built in memory, before saving
    loaded: object  # the Embedder loaded from ``folder`` (the "embedder" path, and what ONNX exports)
    prompts: list[str | None]
    texts: list[str]
    expected: dict = field(default_factory=dict)  # prompt -> (N, D) reference embeddings at fp32


# ---------------------------------------------------------------------------- models and texts
def real_texts(n: int, long: int = 0, long_words: int = 0) -> list[str]:
    """n real texts of mixed length from the standard library (docstring summaries, function sources),
    then ``long`` texts of about ``long_words`` words (sources joined)."""
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    rng = random.Random(0)
    rng.shuffle(pairs)
    texts = [p.query if i % 2 else p.positive[:1500] for i, p in enumerate(pairs[:n])]
    words = " ".join(p.positive for p in pairs[n : n + 400]).split()
    return texts + [" ".join(words[i * long_words : (i + 1) * long_words]) for i in range(long)]


def build_cases(work: Path, quick: bool, only: list[str]) -> list[Case]:
    import torch

    from embforge.modeling.head import HeadSpec
    from embforge.models.build import apply_lora
    from embforge.models.embedder import Embedder
    from embforge.models.nomic_bert import build_backbone
    from embforge.models.nomic_bert_config import from_name
    from embforge.models.spec import LoraConfig
    from embforge.models.tiny import tiny_bpe, tiny_decoder
    from embforge.models.tokenizers import nomic_tokenizer

    n = 40 if quick else 200
    texts = real_texts(n)
    cases = []
    for name in only:
        torch.manual_seed(0)
        if name in ("minilm", "minilm-instruction"):
            instruction = name == "minilm-instruction"
            prompts_of = {"query": INSTRUCTION if instruction else "query: "}
            model = Embedder.load("all-MiniLM-L6-v2", device="cpu", prompts=prompts_of, pool_prompt=not instruction)
            prompts, case_texts = [None, "query"], texts
        elif name == "nomic-ntk":
            trained = 64 if quick else 2048
            spec = from_name(
                "nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                max_trained_len=trained,
            )  # fmt: skip
            model = Embedder(
                build_backbone(spec),
                nomic_tokenizer(),
                HeadSpec(
                    max_seq_len=2 * trained,
                    prompts={"query": "search_query: ", "document": "search_document: "},
                    matryoshka_rule="layer_norm",
                ),
            )
            # Python source runs about 3 WordPiece tokens a word: these fill the window, past the trained length
            case_texts = texts + real_texts(0, long=6, long_words=trained // 2)
            prompts = ["query", "document"]
        else:
            bpe = tiny_bpe(texts)
            decoder = name in ("nv-decoder", "nv-adapter")
            backbone, tokenizer = tiny_decoder("mistral" if decoder else "qwen3", tokenizer=bpe)
            model = Embedder(
                backbone,
                tokenizer,
                HeadSpec(
                    pooling={"name": "latent", "num_latents": 16, "num_heads": 2, "head_dim": 32}
                    if decoder
                    else "last",
                    attention="bidirectional" if decoder else "causal",
                    pool_prompt=not decoder,
                    add_eos=True,
                    padding_side="right" if decoder else "left",
                    prompts={"query": INSTRUCTION},
                    instruction_template="Instruct: {instruction}\nQuery: ",
                    max_seq_len=128,
                ),
            )
            prompts, case_texts = [None, "query"], texts
            if name == "nv-adapter":
                apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
                with torch.no_grad():  # a fresh adapter (B = 0) changes nothing: make it count
                    for key, p in model.backbone.named_parameters():
                        if "lora_B" in key:
                            p.normal_(0, 0.05)
        folder = model.save(work / name, merge_lora=name != "nv-adapter")
        model.eval()
        loaded = Embedder.load(folder, device="cpu", precision="fp32")
        case = Case(name, folder, model, loaded, prompts, case_texts)
        for prompt in prompts:
            case.expected[prompt] = model.encode(
                case_texts, prompt_name=prompt, batch_size=16, precision="fp32", show_progress=False
            )
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------- measuring
def two_batchings(texts: list[str], encode, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``encode(list, batch_size)`` of the texts in order (batches of 16), and of a shuffled order (batches
    of 7), put back in order: the same texts with other batch-mates."""
    order = np.random.default_rng(seed).permutation(len(texts))
    first = np.asarray(encode(texts, 16))
    shuffled = np.asarray(encode([texts[i] for i in order], 7))
    second = np.empty_like(shuffled)
    second[order] = shuffled
    return first, second


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def top10_overlap(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean share of each text's 10 nearest other texts (cosine) that ``got`` keeps."""

    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :10]

    a, b = neighbours(ref), neighbours(got)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


def cell(case: Case, path: str, results: dict) -> dict:
    """Figures and verdict of one (model, path): ``results`` maps prompt -> (first, second) batchings."""
    cos = np.concatenate([cosines(case.expected[p], first) for p, (first, _) in results.items()])
    invariance = max(float(np.abs(first - second).max()) for first, second in results.values())
    out = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "invariance": invariance}
    if path == "onnx-int8":
        out["top10"] = float(np.mean([top10_overlap(case.expected[p], f) for p, (f, _) in results.items()]))
        out["ok"] = out["mean_cos"] >= INT8_MEAN_COS and out["top10"] >= INT8_TOP10
    else:
        out["ok"] = out["min_cos"] >= (ONNX_MIN_COS if path == "onnx-fp32" else MIN_COS)
    out["ok"] = bool(out["ok"] and (path == "onnx-int8" or invariance <= INVARIANCE))
    return out


# ---------------------------------------------------------------------------- the paths
def path_embedder(case: Case) -> dict:
    return {
        p: two_batchings(
            case.texts, lambda t, b, p=p: case.loaded.encode(t, prompt_name=p, batch_size=b, show_progress=False), 1
        )
        for p in case.prompts
    }


def path_sentence_transformers(case: Case) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(case.folder), trust_remote_code=True, device="cpu")
    return {
        p: two_batchings(case.texts, lambda t, b, p=p: model.encode(t, prompt_name=p, batch_size=b), 2)
        for p in case.prompts
    }


_SNIPPET_RUNNER = r"""
import json, sys
sys.modules["embforge"] = None  # plain transformers: `import embforge` fails here
import numpy as np
snippet, texts, prompts, out = open(sys.argv[1]).read(), json.load(open(sys.argv[2])), json.loads(sys.argv[3]), sys.argv[4]
scope = {}
exec(snippet, scope)
result = {}
for prompt in prompts:
    for name, order, size in (("first", list(range(len(texts))), 16), ("second", json.loads(sys.argv[5]), 7)):
        chunk = [texts[i] for i in order]
        parts = [scope["embed"](chunk[s : s + size], prompt_name=prompt).float().numpy() for s in range(0, len(chunk), size)]
        emb = np.concatenate(parts)
        back = np.empty_like(emb)
        back[order] = emb
        result[f"{prompt}|{name}"] = back
np.savez(out, **result)
"""


def readme_snippet(folder: Path) -> str:
    """The Python block of the ``## transformers`` section of the folder's README.md, pointed at ``folder``."""
    from embforge.models.model_card import PATH_LINE

    text = (folder / "README.md").read_text()
    block = text.split("## transformers", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert PATH_LINE in block, "the snippet's path line changed"
    return block.replace(PATH_LINE, f"path = {str(folder)!r}")


def path_transformers(case: Case, work: Path) -> dict:
    snippet, texts = work / f"{case.name}-snippet.py", work / f"{case.name}-texts.json"
    snippet.write_text(readme_snippet(case.folder))
    texts.write_text(json.dumps(case.texts))
    order = np.random.default_rng(3).permutation(len(case.texts)).tolist()
    out = work / f"{case.name}-transformers.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-c",
        _SNIPPET_RUNNER,
        str(snippet),
        str(texts),
        json.dumps(case.prompts),
        str(out),
        json.dumps(order),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=work)
    got = np.load(out)
    return {p: (got[f"{p}|first"], got[f"{p}|second"]) for p in case.prompts}


def path_onnx(case: Case, work: Path, quantized: bool) -> dict:
    from embforge.onnx.export import export_onnx
    from embforge.onnx.runtime import OnnxEmbedder

    folder = work / f"{case.name}-onnx"
    if not folder.is_dir():
        export_onnx(case.loaded, folder, quantize=True)
    model = OnnxEmbedder(folder, quantized=quantized)
    return {
        p: two_batchings(
            case.texts, lambda t, b, p=p: model.encode(t, prompt_name=p, batch_size=b, show_progress=False), 4
        )
        for p in case.prompts
    }


def path_serve(case: Case, clients: int = 8, copies_each: int = 2) -> dict[str, dict]:
    """8 concurrent clients; every (text, prompt, format) is sent ``copies_each`` times, by different clients,
    in shuffled batches of 1-12 mixed-length texts. -> {"serve-float": results, "serve-base64": results}"""
    import httpx

    from embforge.serve.launch import start_server, stop_server

    flags = ("--precision", "fp32", "--served-model-name", "parity", "--truncate")  # truncate as encode does
    proc, url = start_server(str(case.folder), *flags)
    copies: dict[tuple, list[np.ndarray]] = {}
    lock = threading.Lock()

    items = [(i, p, fmt) for i in range(len(case.texts)) for p in case.prompts for fmt in ("float", "base64")]
    random.Random(0).shuffle(items)
    shares: list[list] = [[] for _ in range(clients)]
    for k in range(copies_each):  # copy k of item j goes to client j + k * clients / copies (another one)
        for j, item in enumerate(items):
            shares[(j + k * clients // copies_each) % clients].append(item)

    def client(c: int) -> None:
        rng = random.Random(c)
        work = shares[c]
        rng.shuffle(work)
        with httpx.Client(timeout=120) as http:
            while work:
                size = rng.randint(1, 12)
                prompt, fmt = work[0][1], work[0][2]
                batch = [w for w in work if w[1] == prompt and w[2] == fmt][:size]
                for w in batch:
                    work.remove(w)
                body = {"model": "parity", "input": [case.texts[i] for i, _, _ in batch], "encoding_format": fmt}
                if prompt is not None:
                    body["prompt_name"] = prompt
                reply = http.post(f"{url}/v1/embeddings", json=body)
                reply.raise_for_status()
                for (i, p, f), item in zip(batch, reply.json()["data"]):
                    emb = item["embedding"]
                    vec = (
                        np.frombuffer(base64.b64decode(emb), dtype="<f4")
                        if f == "base64"
                        else np.asarray(emb, np.float32)
                    )
                    with lock:
                        copies.setdefault((f, p, i), []).append(vec)

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
    finally:
        stop_server(proc)
    out: dict[str, dict] = {}
    for fmt in ("float", "base64"):
        results = {}
        for p in case.prompts:
            # per text: its first copy, and its copy furthest from the first (batch invariance)
            first, furthest = np.empty_like(case.expected[p]), np.empty_like(case.expected[p])
            for i in range(len(case.texts)):
                got = copies[(fmt, p, i)]
                assert len(got) == copies_each, f"text {i} came back {len(got)} times"
                first[i] = got[0]
                furthest[i] = max(got, key=lambda v, f=got[0]: float(np.abs(v - f).max()))
            results[p] = (first, furthest)
        out[f"serve-{fmt}"] = results
    return out


def run_case(case: Case, work: Path, paths: list[str]) -> dict[str, dict]:
    cells = {}
    for path in paths:
        if path.startswith("serve-"):
            if "serve-float" not in cells:
                for name, results in path_serve(case).items():
                    if name in paths:
                        cells[name] = cell(case, name, results)
            continue
        if path == "embedder":
            results = path_embedder(case)
        elif path == "sentence-transformers":
            results = path_sentence_transformers(case)
        elif path == "transformers":
            results = path_transformers(case, work)
        else:
            results = path_onnx(case, work, quantized=path == "onnx-int8")
        cells[path] = cell(case, path, results)
    return cells


def table(all_cells: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| model | path | min cos | mean cos | invariance max |Δ| | top-10 | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, cells in all_cells.items():
        for path, c in cells.items():
            top = f"{c['top10']:.1%}" if "top10" in c else ""
            lines.append(
                f"| {model} | {path} | {c['min_cos']:.7f} | {c['mean_cos']:.7f} | {c['invariance']:.1e} | {top} | "
                f"{'yes' if c['ok'] else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small texts and trained length (the tests' size)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embforge-parity-") as tmp:
        work = Path(tmp)
        all_cells = {}
        for case in build_cases(work, args.quick, args.models):
            all_cells[case.name] = run_case(case, work, args.paths)
            print(f"{case.name}: done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(all_cells))
    ok = all(c["ok"] for cells in all_cells.values() for c in cells.values())
    summary = {
        "bench": "parity",
        "quick": args.quick,
        "ok": ok,
        "seconds": round(time.perf_counter() - start, 1),
        "cells": {f"{m}/{p}": c for m, cells in all_cells.items() for p, c in cells.items()},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
