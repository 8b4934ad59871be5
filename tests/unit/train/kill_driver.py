"""One training run of the ``kill -9`` test (test_checkpoint.py), run in a child process.

The test starts it through a multiprocessing fork server that has imported this module
(torch, transformers, embforge) once, so each run costs a fork and a second of training
instead of a Python start-up; every run is still a separate process that ``SIGKILL`` ends
with no chance to clean up.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: F401  (imported once, in the fork server)

import embforge.atomic as atomic
from embforge.train.contrastive import train_stage
from embforge.train.parallel import DistInfo

from .helpers import stage_config, tiny_embedder

STEPS = 18  # 6 checkpoints
SAVE_EVERY = 3


def die_at_fsync(k: int) -> None:
    """SIGKILL this process at the k-th fsync of the atomic writer: inside a checkpoint write
    (between two files, before the manifest, before or after the rename), inside the deletion
    of an old checkpoint, or in the metrics-log rewrite."""
    real, calls = atomic._fsync, [0]

    def fsync(path):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)

    atomic._fsync = fsync


def main(data: Path, out: Path, die_at: int = 0, ready=None) -> None:
    """Train (resuming from ``out``) to step STEPS; ``ready.set()`` once training is about to start."""
    torch.set_num_threads(1)
    if die_at:
        die_at_fsync(die_at)
    model = tiny_embedder(dropout=0.1)  # dropout: the RNG state must survive the kills too
    stage = stage_config(steps=STEPS, save_every=SAVE_EVERY, log_every=2, keep_last_checkpoints=2)
    if ready is not None:
        ready.set()
    train_stage(model, stage, data_root=data, stage_dir=out, recipe_dict={}, info=DistInfo(), seed=3, resume=True)
