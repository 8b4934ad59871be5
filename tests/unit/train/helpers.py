"""Builders shared by the training tests (importable by spawned worker processes)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
from pathlib import Path

import torch

from embforge.config import from_dict
from embforge.data.pairs import Example
from embforge.data.records import TrainingRecord
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import TINY_WORDS, tiny_bert
from embforge.train.batches import ContrastiveBatch, collate
from embforge.train.contrastive import train_stage
from embforge.train.parallel import DistInfo
from embforge.train.recipe import DataConfig, DatasetConfig, StageConfig


def tiny_embedder(dropout: float = 0.0, seed: int = 0) -> Embedder:
    model, tokenizer = tiny_bert(seed, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return Embedder(model, tokenizer, HeadSpec(max_seq_len=32))


def sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, n)))


def records(count: int, num_negatives: int, seed: int = 0) -> list[TrainingRecord]:
    rng = random.Random(seed)
    return [
        TrainingRecord(sentence(rng), [sentence(rng, 10)], [sentence(rng, 10) for _ in range(num_negatives)])
        for _ in range(count)
    ]


def write_pair_files(folder) -> None:
    """The training data of stage_config: memory.jsonl and a streamed dataset in two shards."""

    def _jsonl(path, recs) -> None:
        with path.open("w") as f:
            for r in recs:
                f.write(json.dumps({"query": r.query, "positive": r.positive, "negatives": r.negatives}) + "\n")

    _jsonl(folder / "memory.jsonl", records(40, num_negatives=1, seed=1))
    for shard in range(2):
        _jsonl(folder / f"stream-{shard}.jsonl", records(15, num_negatives=1, seed=10 + shard))


def stage_config(steps=20, **over) -> StageConfig:
    """A one-stage config (fp32, two datasets, one streamed) over write_pair_files' data."""
    raw = {
        "name": "s",
        "steps": steps,
        "log_every": 5,
        "save_every": 10,
        "precision": "fp32",
        "data": {
            "batch_size": 4,
            "num_negatives": 1,
            "no_duplicates": False,
            "datasets": [
                {"name": "memory", "path": "memory.jsonl", "weight": 2.0},
                {"name": "stream", "path": "stream-*.jsonl", "stream": True, "in_batch_negatives": False},
            ],
        },
        "loss": {"temperature": 0.05},
        "optim": {"lr": 1e-3, "warmup_steps": 3, "schedule": "cosine"},
    }
    raw.update(over)
    return from_dict(StageConfig, raw)


def train_on(data_dir, stage_dir, model: Embedder, stage: StageConfig, *, info: DistInfo | None = None, **kwargs):
    """``train_stage`` of ``model`` on the tests' data (seed 3, no recipe), in one process unless ``info`` says
    otherwise; ``kwargs``: resume, evaluator, parallel. Returns the logged rows."""
    return train_stage(
        model,
        stage,
        data_root=Path(data_dir),
        stage_dir=Path(stage_dir),
        recipe_dict={},
        info=info or DistInfo(),
        seed=3,
        **kwargs,
    )


@contextlib.contextmanager
def crash_in_step(step: int):
    """Inside the block, training raises KeyboardInterrupt when it asks for the batch of ``step``."""
    from embforge.data.pairs import BatchSampler

    calls, real_next = [0], BatchSampler.next_batch

    def crashing(self):
        calls[0] += 1
        if calls[0] >= step:
            raise KeyboardInterrupt(f"simulated crash in step {step}")
        return real_next(self)

    BatchSampler.next_batch = crashing
    try:
        yield
    finally:
        BatchSampler.next_batch = real_next


def make_batch(
    model: Embedder,
    recs: list[TrainingRecord],
    num_negatives: int,
    in_batch: list[bool] | None = None,
    b_negatives: int | None = None,
) -> ContrastiveBatch:
    """A ContrastiveBatch of ``recs``; ``in_batch`` picks dataset 0 (True) or 1 (False) per record;
    ``b_negatives``: dataset 1's own num_negatives (None: ``num_negatives``, as dataset 0's)."""
    data = DataConfig(
        datasets=[
            DatasetConfig(name="a", path="-", query_prompt="q: "),
            DatasetConfig(name="b", path="-", in_batch_negatives=False, num_negatives=b_negatives),
        ],
        num_negatives=num_negatives,
    )
    flags = in_batch or [True] * len(recs)
    examples = [
        Example(0 if f else 1, r, r.positive, r.negatives[: data.negatives_of(data.datasets[0 if f else 1])])
        for r, f in zip(recs, flags)
    ]

    def tokenize(texts, prompts):
        return model.tokenize(texts, prompt=prompts)

    return collate(examples, data, tokenize, torch.device("cpu"))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_lora_embedder(seed: int = 0, base_seed: int = 0) -> Embedder:
    """A tiny NV-Embed-style model: bidirectional Llama (base weights seeded by ``base_seed``, the same
    for every ``seed``), latent head + LoRA seeded by ``seed``."""
    from embforge.models.build import apply_lora
    from embforge.models.spec import LoraConfig
    from embforge.models.tiny import tiny_decoder

    backbone, tokenizer = tiny_decoder("llama", seed=base_seed)  # the frozen base is the same for every seed
    torch.manual_seed(seed)
    model = Embedder(
        backbone,
        tokenizer,
        HeadSpec(
            max_seq_len=32,
            pooling={"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16},
            pool_prompt=False,
        ),
    )
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    return model


def free_port() -> int:
    """A TCP port free right now on localhost (for a test's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets for a worker, so spawned test workers join through ``init_distributed``."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (worker loops, TCP loop); empty where /proc is missing."""
    names = []
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def run_ok(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    """Run a command (e.g. torchrun ... -m embforge) to completion; it must exit 0 and leave its group cleanly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outlived destroy_process_group" not in proc.stderr, proc.stderr[-3000:]
    return proc
