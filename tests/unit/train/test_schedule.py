"""LR schedules (torch's, in embforge.train.schedule): the documented values, exact resume, old checkpoints."""

import json
import math

import pytest
import torch

from embforge.train.recipe import OptimConfig
from embforge.train.schedule import build_scheduler, restore_scheduler


def _factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """The documented schedule: linear warm-up (step+1)/warmup, then linear / cosine decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"linear": max(0.0, 1.0 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))}.get(
        schedule, 1.0
    )


def _run(schedule, warmup, total, lr=0.1):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    return opt, build_scheduler(opt, OptimConfig(lr=lr, warmup_steps=warmup, schedule=schedule), total)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (1, 10), (3, 10), (5, 5), (4, 37), (400, 3000)])
def test_schedule_values(schedule, warmup, total):
    opt, sched = _run(schedule, warmup, total)
    for step in range(total + 1):  # the rate after the last step is logged too
        # torch's schedulers update the rate multiplicatively: equal to the closed form up to rounding
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * _factor(schedule, warmup, total, step), rel=0, abs=1e-13)
        opt.step()
        sched.step()


def test_pinned_values():
    opt, sched = _run("cosine", 2, 6)
    got = []
    for _ in range(6):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert got == pytest.approx([0.05, 0.1, 0.1, 0.085355339059327, 0.05, 0.014644660940673], rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_resume_continues_the_same_values_exactly(schedule):
    total, cut = 20, 7
    opt, sched = _run(schedule, 3, total)
    reference = []
    for step in range(total):
        reference.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        if step == cut - 1:  # what a checkpoint holds: optimizer state, scheduler state as JSON
            opt_state, sched_state = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = _run(schedule, 3, total)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    resumed = []
    for _ in range(cut, total):
        resumed.append(sched2.get_last_lr()[0])
        opt2.step()
        sched2.step()
    assert resumed == reference[cut:]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_a_checkpoint_from_the_lambda_lr_schedules_resumes_with_the_same_values(schedule):
    """Checkpoints written before the switch hold a LambdaLR state; they resume on the same schedule."""
    total, warmup, cut = 20, 3, 7
    p = torch.nn.Parameter(torch.zeros(1))
    old_opt = torch.optim.AdamW([p], lr=0.1)
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda step: _factor(schedule, warmup, total, step))
    for _ in range(cut):
        old_opt.step()
        old.step()
    opt_state, sched_state = old_opt.state_dict(), json.loads(json.dumps(old.state_dict()))
    assert "lr_lambdas" in sched_state
    opt, sched = _run(schedule, warmup, total)
    opt.load_state_dict(opt_state)
    restore_scheduler(sched, sched_state)
    resumed = []
    for _ in range(cut, total + 1):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * _factor(schedule, warmup, total, step) for step in range(cut, total + 1)]
    assert resumed == pytest.approx(expected, rel=0, abs=1e-13)
