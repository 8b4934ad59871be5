"""Shared by the benchmarks: run one measurement in its own process (own peak RSS)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, args: list[str], threads: int) -> dict:
    """Run ``script --worker ...`` with ``threads`` threads, offline; return its last-line JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"worker {' '.join(args)} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])
