"""Learning-rate schedules, from ``torch.optim.lr_scheduler``.

Linear warm-up over ``warmup_steps`` (factor ``(step + 1) / warmup_steps``), then linear
decay to 0, cosine decay to 0, or constant, ending at ``total_steps``: a
:class:`~torch.optim.lr_scheduler.SequentialLR` of a :class:`LinearLR` warm-up and a
:class:`LinearLR` / :class:`CosineAnnealingLR` / :class:`ConstantLR` decay. The values
are pinned by ``tests/unit/train/test_schedule.py`` (equal to the closed forms to 1e-13).

Each parameter group decays from its own peak (its ``lr``; the pooling head's groups have
``optim.head_lr``). When the head also warms up over its own ``head_warmup_steps``, the
groups no longer share one factor, and :class:`GroupWarmupLR` gives every group that
closed form with its own warm-up instead.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from embforge.train.recipe import OptimConfig

HEAD_GROUP = "head"  # the ``name`` of the optimizer groups holding the pooling head's parameters


def lr_factor(schedule: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """The documented schedule's factor at ``step``: the closed form torch's schedulers follow."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class GroupWarmupLR(LRScheduler):
    """Every parameter group on :func:`lr_factor` with its own warm-up (its peak is its initial ``lr``).

    Its state (step, warm-ups, schedule) is plain JSON: a checkpoint resumes it exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmups: list[int], schedule: str, total_steps: int):
        self.warmups, self.schedule, self.total_steps = list(warmups), schedule, total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [
            base * lr_factor(self.schedule, warmup, self.total_steps, self.last_epoch)
            for base, warmup in zip(self.base_lrs, self.warmups)
        ]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LRScheduler:
    """The schedule of ``cfg`` over ``total_steps`` optimizer steps (step once per optimizer step)."""
    head_warmup = cfg.warmup_steps if cfg.head_warmup_steps is None else cfg.head_warmup_steps
    warmups = [head_warmup if g.get("name") == HEAD_GROUP else cfg.warmup_steps for g in optimizer.param_groups]
    if len(set(warmups)) > 1:
        return GroupWarmupLR(optimizer, warmups, cfg.schedule, total_steps)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        decay: LRScheduler = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay_steps)
    elif cfg.schedule == "cosine":
        decay = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=0.0)
    else:
        decay = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not cfg.warmup_steps:
        return decay
    # (step + 1) / W at steps 0 .. W-1: 1/W at step 0, reaching 1 at step W-1
    warmup = LinearLR(optimizer, start_factor=1.0 / cfg.warmup_steps, end_factor=1.0, total_iters=cfg.warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, decay], milestones=[cfg.warmup_steps])


def restore_scheduler(scheduler: LRScheduler, state: dict) -> None:
    """Load a checkpoint's scheduler state into a freshly built ``scheduler`` (after the optimizer's state).

    Checkpoints written before the schedules came from torch hold a ``LambdaLR`` state
    (``lr_lambdas``) of the same schedule: the fresh scheduler is stepped forward to its
    step instead, from the learning rates it started with.
    """
    if "lr_lambdas" not in state:
        scheduler.load_state_dict(state)
        return
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the optimizer's loaded state holds the checkpoint's rate; start from step 0's
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["last_epoch"]):
            scheduler.step()
