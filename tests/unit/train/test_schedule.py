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


# ---------------------------------------------------------------------------- the pooling head's own LR
def _head_optimizer(wrap: bool = False, **optim):
    from embforge.train.schedule import build_optimizer

    from .helpers import tiny_lora_embedder

    model = tiny_lora_embedder()

    class Wrapped(torch.nn.Module):  # like DDP: the Embedder under .module, its names prefixed "module."
        def __init__(self, module):
            super().__init__()
            self.module = module

    cfg = OptimConfig(lr=1e-3, schedule="linear", **optim)
    return model, build_optimizer(Wrapped(model) if wrap else model, cfg), cfg


@pytest.mark.parametrize("wrap", [False, True])
def test_the_head_follows_its_own_peak_and_warm_up(wrap):
    total = 12
    model, opt, cfg = _head_optimizer(wrap, warmup_steps=4, head_lr=1e-2, head_warmup_steps=2)
    head = [g for g in opt.param_groups if g.get("name") == "head"]
    rest = [g for g in opt.param_groups if g.get("name") != "head"]
    assert {id(p) for g in head for p in g["params"]} == {id(p) for p in model.pooler.parameters()}
    assert not {id(p) for g in rest for p in g["params"]} & {id(p) for p in model.pooler.parameters()}
    sched = build_scheduler(opt, cfg, total)
    for step in range(total + 1):
        for g in head:
            assert g["lr"] == pytest.approx(1e-2 * _factor("linear", 2, total, step), rel=0, abs=1e-15), step
        for g in rest:
            assert g["lr"] == pytest.approx(1e-3 * _factor("linear", 4, total, step), rel=0, abs=1e-15), step
        opt.step()
        sched.step()


def test_head_lr_alone_keeps_the_common_warm_up():
    total = 10
    _, opt, cfg = _head_optimizer(warmup_steps=3, head_lr=5e-3)
    sched = build_scheduler(opt, cfg, total)
    for step in range(total + 1):
        for g in opt.param_groups:
            peak = 5e-3 if g.get("name") == "head" else 1e-3
            assert g["lr"] == pytest.approx(peak * _factor("linear", 3, total, step), rel=0, abs=1e-13)
        opt.step()
        sched.step()


def test_a_head_schedule_resumes_exactly_from_its_json_state():
    total, cut = 12, 5
    _, opt, cfg = _head_optimizer(warmup_steps=4, head_lr=1e-2, head_warmup_steps=1)
    sched = build_scheduler(opt, cfg, total)
    reference = []
    for step in range(total):
        reference.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if step == cut - 1:
            opt_state, sched_state = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))
    _, opt2, _ = _head_optimizer(warmup_steps=4, head_lr=1e-2, head_warmup_steps=1)
    sched2 = build_scheduler(opt2, cfg, total)
    opt2.load_state_dict(opt_state)
    restore_scheduler(sched2, sched_state)
    resumed = []
    for _ in range(cut, total):
        resumed.append([g["lr"] for g in opt2.param_groups])
        opt2.step()
        sched2.step()
    assert resumed == reference[cut:]


def test_head_options_need_a_trainable_head():
    from embforge.config import from_dict
    from embforge.errors import ConfigError
    from embforge.train.schedule import build_optimizer

    from .helpers import tiny_embedder

    with pytest.raises(ConfigError, match="no trainable pooling-head parameters"):
        build_optimizer(tiny_embedder(), OptimConfig(head_lr=1e-3))  # mean pooling: no parameters
    with pytest.raises(ConfigError, match="head_lr must be > 0"):
        from_dict(OptimConfig, {"head_lr": 0})


def test_a_stage_with_its_own_head_schedule_resumes_exactly(data_dir, tmp_path):
    from .helpers import crash_in_step, stage_config, tiny_lora_embedder, train_on

    optim = {"lr": 1e-3, "warmup_steps": 4, "head_lr": 3e-3, "head_warmup_steps": 1, "schedule": "cosine"}
    stage = stage_config(steps=6, save_every=3, log_every=1, optim=optim)
    straight = tiny_lora_embedder(seed=1)
    rows = train_on(data_dir, tmp_path / "a", straight, stage)
    assert [r["lr_head"] for r in rows] == pytest.approx([3e-3 * _factor("cosine", 1, 6, s) for s in range(1, 7)])
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * _factor("cosine", 4, 6, s) for s in range(1, 7)])
    with crash_in_step(5), pytest.raises(KeyboardInterrupt):
        train_on(data_dir, tmp_path / "b", tiny_lora_embedder(seed=1), stage)
    resumed = tiny_lora_embedder(seed=2)
    again = train_on(data_dir, tmp_path / "b", resumed, stage, resume=True)
    assert [r["lr_head"] for r in again] == [r["lr_head"] for r in rows]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
