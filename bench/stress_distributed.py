"""Distributed teardown stress: every distributed test and 2-rank ``embforge train`` / ``mine``, N times in a row.

A gloo rank used to die at exit, after its work was done, with ``terminate called without
an active exception`` (SIGABRT): the default process group outlived
``destroy_process_group`` (see ``embforge.train.parallel``), so its gloo threads were still
running during interpreter shutdown. Each round here runs

* ``pytest`` on the distributed tests (2-rank gloo vs 1 rank, group teardown, torchrun
  train DDP/FSDP, torchrun sharded mining),
* ``torchrun --nproc-per-node 2 -m embforge train`` on a tiny one-stage recipe (DDP, checkpoints),
* ``torchrun --nproc-per-node 2 -m embforge mine`` on three tiny shards,

cycling ``OMP_NUM_THREADS`` over 1, 2 and 4 for the two commands (more threads than cores
under load widens scheduling races). A command *aborts* when its output shows SIGABRT or
``terminate called``; it *fails* on any other non-zero exit; it *leaks* when a rank warns
that its process group outlived ``destroy_process_group``.

    python bench/stress_distributed.py            # 25 rounds
    python bench/stress_distributed.py --runs 50
    python bench/stress_distributed.py --quick    # 2 rounds

The last line is one JSON object: rounds, commands run, aborts, failures, leaks, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/unit/train/test_distributed.py", "tests/unit/train/test_torchrun.py", "tests/unit/test_mine_sharded.py"]
OMP_CYCLE = [1, 2, 4]
ABORT = re.compile(r"terminate called|SIGABRT|Signals\.SIGABRT|exitcode\s*:\s*-6|signal 6")
LEAK = "outlived destroy_process_group"

RECIPE = """
model: {{name_or_path: {model}, max_seq_len: 32}}
output_dir: {out}
stages:
  - name: s
    steps: 4
    log_every: 1
    save_every: 2
    precision: fp32
    data:
      batch_size: 2
      num_negatives: 1
      datasets: [{{name: d, path: d.jsonl}}]
    loss: {{temperature: 0.05, symmetric: true}}
    optim: {{lr: 1.0e-3}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(work: Path) -> Path:
    """A tiny saved model, a training file and three mining shards under ``work``; returns the model folder."""
    from embforge.modeling.head import HeadSpec
    from embforge.models.embedder import Embedder
    from embforge.models.tiny import TINY_WORDS, tiny_bert

    model, tokenizer = tiny_bert(0)
    model_dir = Embedder(model, tokenizer, HeadSpec(max_seq_len=32)).save(work / "tiny")
    rng = random.Random(0)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, n)))

    with (work / "d.jsonl").open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"query": sentence(6), "positive": sentence(10), "negatives": [sentence(10)]}) + "\n")
    (work / "in").mkdir()
    for shard in range(3):
        rows = [{"query": f"find {sentence(3)}", "positive": f"the {sentence(8)}"} for _ in range(20)]
        (work / "in" / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir


def _run(cmd: list[str], cwd: Path, omp: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(omp),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=25, help="rounds (default 25)")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--log", default=None, help="append the output of every failed command here")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.runs
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    counts: Counter = Counter()
    per_command: dict[str, Counter] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = _prepare(work)
        commands = {
            "pytest distributed tests": lambda i: [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *TESTS,
            ],
            "torchrun embforge train": lambda i: [
                torchrun,
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_free_port()),
                "-m",
                "embforge",
                "train",
                str(work / f"train-{i}.yaml"),
            ],
            "torchrun embforge mine": lambda i: [
                torchrun,
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_free_port()),
                "-m",
                "embforge",
                "mine",
                str(model_dir),
                "--input",
                "in/part-*.jsonl",
                "--output",
                str(work / f"mined-{i}"),
                "--num-negatives",
                "3",
            ],
        }
        bar = tqdm(total=rounds * len(commands), desc="stress", unit="cmd")
        for i in range(rounds):
            (work / f"train-{i}.yaml").write_text(RECIPE.format(model=model_dir, out=work / f"run-{i}"))
            (work / f"mined-{i}").mkdir()
            omp = OMP_CYCLE[i % len(OMP_CYCLE)]
            for name, build in commands.items():
                cwd = REPO if name.startswith("pytest") else work
                proc = _run(build(i), cwd, omp)
                output = proc.stdout + proc.stderr
                c = per_command.setdefault(name, Counter())
                c["runs"] += 1
                counts["commands"] += 1
                outcome = None
                if proc.returncode != 0:
                    outcome = "aborts" if ABORT.search(output) else "failures"
                elif LEAK in output:
                    outcome = "leaks"
                if outcome:
                    c[outcome] += 1
                    counts[outcome] += 1
                    tqdm.write(f"round {i + 1} {name} (OMP_NUM_THREADS={omp}): {outcome[:-1]}, exit {proc.returncode}")
                    if args.log:
                        with open(args.log, "a") as f:
                            f.write(f"==== round {i + 1} {name} omp={omp} rc={proc.returncode}\n{output[-20000:]}\n")
                bar.update(1)
                bar.set_postfix(aborts=counts["aborts"], failures=counts["failures"], leaks=counts["leaks"])
        bar.close()
    summary = {
        "bench": "stress_distributed",
        "runs": rounds,
        "commands": counts["commands"],
        "aborts": counts["aborts"],
        "failures": counts["failures"],
        "leaks": counts["leaks"],
        "per_command": {k: dict(v) for k, v in per_command.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
