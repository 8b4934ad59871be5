"""THE training loop, once for every objective: from 1 CPU process to N GPUs under ``torchrun``.

:func:`train` owns what every run does the same way: seed, resume from the newest good
checkpoint, optimiser and schedule, precision, the non-finite policy, the logging window,
evaluation, checkpoints and the final save, DDP/FSDP. What is trained is an
:class:`Objective`: it draws batches (in a prefetch thread, in order) and runs one step's
forward and backward (:mod:`embforge.train.contrastive`, :mod:`embforge.train.mlm`).

Per optimizer step: ``grad_accum_steps`` micro-steps of the objective (gradients accumulate;
DDP all-reduces on the last), the mean loss over ranks, clip, then AdamW and the LR schedule.
A non-finite loss or gradient stops the run before the optimizer touches the weights, so the
last checkpoint stays the last good state (or, with ``on_nonfinite: skip``, the step is dropped
and counted).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from embforge.config import PrecisionName
from embforge.errors import EmbforgeError
from embforge.precision import autocast as precision_autocast
from embforge.precision import resolve_precision
from embforge.train.checkpoint import (
    is_sharded,
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    prune_checkpoints,
    ready_checkpoint_dir,
    resume_log,
    resume_point,
    save_checkpoint,
    save_sharded_checkpoint,
)
from embforge.train.host_memory import keep_freed_memory
from embforge.train.parallel import (
    DistInfo,
    average_gradients,
    barrier,
    full_model_state,
    holds_weights,
    is_fsdp,
    optimizer_loader,
    patient_group,
    set_sharded_states,
    sharded_states,
    wrap_model,
)
from embforge.train.prefetch import Prefetcher
from embforge.train.recipe import OptimConfig
from embforge.train.schedule import HEAD_GROUP, build_optimizer, build_scheduler
from embforge.train.sharded_checkpoint import load_sharded_states


class TrainingError(EmbforgeError):
    """Training cannot continue (e.g. the loss became NaN or infinite)."""


@dataclass(frozen=True)
class LoopConfig:
    """When the loop does what (a contrastive or an mlm stage's settings)."""

    name: str  # in messages and on the progress bar
    steps: int
    optim: OptimConfig
    precision: PrecisionName = "auto"
    grad_accum_steps: int = 1
    on_nonfinite: Literal["stop", "skip"] = "stop"
    log_every: int = 10
    eval_every: int = 0
    eval_at_start: bool = False  # a step-0 row with the evaluation before training
    eval_at_end: bool = False  # evaluate at the last step even when eval_every is 0
    save_every: int = 0
    keep_last_checkpoints: int = 3
    best_metric: str | None = None
    eval_timeout_s: float = 6 * 3600  # how long the other ranks wait for rank 0's evaluation


class Objective(Protocol):
    """What the loop trains: its batches, its step, and what it adds to logs and checkpoints."""

    extra_parameters: list[torch.nn.Parameter]  # trained beside the model (outside DDP), decayed like weights

    def draw(self) -> tuple[Any, Any]:
        """The next (micro-)batch and the data position just after it (run in the prefetch thread)."""

    def step(self, model: torch.nn.Module, batch, *, scale: float, sync: bool, autocast) -> tuple[torch.Tensor, dict]:
        """Forward + backward (gradients accumulate, the loss multiplied by ``scale``; DDP all-reduces
        only when ``sync``); returns this rank's unscaled loss (detached) and counters summed over the
        logging window and the ranks (``examples`` and ``tokens`` at least)."""

    def row(self, counts: dict[str, float]) -> dict:
        """The objective's own fields of a metrics row, from the window's counters summed over ranks."""

    def load(self, checkpoint: Path, state: dict | None) -> None:
        """Resume: ``state`` None: before wrapping the model (tensors trained beside it); else the
        trainer state saved with the checkpoint (the data position)."""

    def checkpoint_state(self, position) -> tuple[dict, dict]:
        """(trainer state to save — the data position of the last batch trained on —, extra model tensors)."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------- collectives
def sum_over_ranks(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class _Window:
    """The logging window: steps' losses and the objective's counters since the last row."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start, self.losses, self.skipped, self.counts = time.perf_counter(), [], 0, {}

    def add(self, counts: dict) -> None:
        for k, v in counts.items():  # tensors stay on the device: no host sync per step
            self.counts[k] = self.counts.get(k, 0) + v

    def totals(self, info: DistInfo) -> dict[str, float]:
        """The counters summed over ranks (one collective)."""
        keys = sorted(self.counts)
        values = torch.stack([torch.as_tensor(self.counts[k], device=self.device).double() for k in keys])
        return dict(zip(keys, sum_over_ranks(values, info).tolist()))


def train(
    setup: Callable[[], tuple[torch.nn.Module, Objective]],
    cfg: LoopConfig,
    *,
    stage_dir: Path,
    recipe_dict: dict,
    info: DistInfo,
    seed: int,
    parallel: str = "ddp",
    resume: bool = True,
    evaluator: Callable[[torch.nn.Module], dict] | None = None,
) -> list[dict]:
    """Train the model ``setup()`` builds, in place; return the logged metrics.

    Args:
        setup: called once the seed is set: the (unwrapped) model, wrapped here for DDP/FSDP when
            world > 1, and the objective.
        stage_dir: checkpoints, ``metrics.jsonl`` go here.
        recipe_dict: the resolved recipe, saved beside every checkpoint.
        info: rank, world size and device.
        seed: the global torch seed, set before ``setup`` (the data order is the objective's).
        resume: continue from the newest checkpoint in ``stage_dir`` if there is one.
        evaluator: ``(model) -> {key: value}`` on rank 0, logged as they are (scores as ``eval/<name>``,
            which checkpoints keep and ``best_metric`` names), every ``eval_every`` steps.
    """
    torch.manual_seed(seed)
    model, objective = setup()
    with contextlib.closing(objective):
        return _train(model, objective, cfg, stage_dir, recipe_dict, info, parallel, resume, evaluator)


def _train(module, objective, cfg, stage_dir, recipe_dict, info, parallel, resume, evaluator) -> list[dict]:
    ckpt_dir = stage_dir / "checkpoints"
    if info.is_main:
        ready_checkpoint_dir(ckpt_dir)
    barrier()
    latest = resume_point(ckpt_dir, resume)
    sharded = latest is not None and is_sharded(latest)  # written under FSDP: loaded into the wrapped model below
    if latest is not None and not sharded and holds_weights(module):  # FSDP ranks > 0 hold a meta model
        load_model_weights(latest, module)  # before wrapping: DDP broadcasts and FSDP shards these weights
    if latest is not None:
        objective.load(latest, None)
    model = wrap_model(module, info, parallel)
    extra = objective.extra_parameters
    optim = cfg.optim.resolved(cfg.steps)  # warmup_fraction -> warmup_steps
    optimizer = build_optimizer(model, optim, extra)
    scheduler = build_scheduler(optimizer, optim, cfg.steps)
    start = 0
    if latest is not None:
        if sharded:  # each rank reads only its own shards of the weights and optimizer state
            states = sharded_states(model, optimizer)
            load_sharded_states(latest, states)
            set_sharded_states(model, optimizer, states)
        state = load_training_state(latest, None if sharded else optimizer_loader(model, optimizer), scheduler)
        objective.load(latest, state)
        start = state["step"]
    evaluates = evaluator is not None and (cfg.eval_every or cfg.eval_at_end or cfg.eval_at_start)
    # ranks > 0 wait for rank 0's evaluations here, with a timeout of their own (not the group's)
    eval_group = patient_group(cfg.eval_timeout_s) if evaluates else None
    log_file = stage_dir / "metrics.jsonl"
    history = resume_log(log_file, start, rewrite=info.is_main)  # lines past the checkpoint are dropped
    precision = resolve_precision(cfg.precision, info.device)
    autocast = functools.partial(precision_autocast, precision, info.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    def log(row: dict) -> None:
        history.append(row)
        if info.is_main:
            with log_file.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def run_evaluation() -> dict:
        scores = {}
        if is_fsdp(model):  # rank 0 evaluates its unsharded copy: the shards are gathered into it
            trained = full_model_state(model)
            if info.is_main:
                module.load_state_dict(trained, strict=False)  # frozen weights never change
        if info.is_main:
            module.eval()
            with batches.paused():  # evaluation tokenises too; the tokenizer is not shared across threads
                scores = evaluator(module)
            model.train()
        barrier(eval_group)
        return scores

    def head_lr() -> dict:  # the pooling head's own rate, where it has one (optim.head_lr / head_warmup_steps)
        rates = [lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()) if g.get("name") == HEAD_GROUP]
        return {"lr_head": rates[0]} if rates else {}

    position = None  # the data position of the last batch trained on (not read ahead)

    def save(step: int) -> None:
        with batches.paused():  # the prefetch thread counts into the data report as it reads
            trainer_state, extra_state = objective.checkpoint_state(position)
        last = history[-1] if history and history[-1]["step"] == step else {}
        metrics = {k: v for k, v in last.items() if k.startswith("eval/")}  # an evaluation at this very step
        if is_fsdp(model):  # every rank writes its own shards: nothing is gathered
            states = sharded_states(model, optimizer)
            save_sharded_checkpoint(ckpt_dir, step, states, scheduler, trainer_state, recipe_dict, metrics=metrics)
        elif info.is_main:
            model_state = {**full_model_state(model), **extra_state}
            save_checkpoint(
                ckpt_dir,
                step,
                model_state,
                optimizer.state_dict(),
                scheduler,
                trainer_state,
                recipe_dict,
                metrics=metrics,
            )
        if info.is_main:
            prune_checkpoints(ckpt_dir, cfg.keep_last_checkpoints, cfg.best_metric)
        barrier()

    batches = Prefetcher(objective.draw, (cfg.steps - start) * cfg.grad_accum_steps)
    model.train()
    if start == 0 and cfg.eval_at_start and evaluator is not None:
        log({"step": 0, **run_evaluation()})
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.name} ({precision})", disable=not info.is_main, unit="step")
    window = _Window(info.device)
    # CPU: freed step buffers stay mapped (not page-faulted back in every step); the prefetch
    # thread is closed on the way out, whatever ends the loop
    with keep_freed_memory(info.device.type == "cpu"), contextlib.closing(batches):
        for step in range(start, cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for micro in range(cfg.grad_accum_steps):
                batch, position = batches.next()
                loss, counts = objective.step(
                    model,
                    batch,
                    scale=1.0 / cfg.grad_accum_steps,
                    sync=micro == cfg.grad_accum_steps - 1,
                    autocast=autocast,
                )
                losses.append(loss)
                window.add(counts)
            loss = float(sum_over_ranks(torch.stack(losses).mean(), info)) / info.world
            average_gradients(extra, info)  # trained outside DDP: each rank holds its own loss's gradient
            # gradients are already reduced over ranks here, so every rank sees the same norm and decides alike
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [*model.parameters(), *extra], cfg.optim.max_grad_norm or float("inf")
            )
            checked = {"loss": loss, "gradient norm": float(grad_norm)}
            bad = next((name for name, value in checked.items() if not math.isfinite(value)), None)
            if bad is not None and cfg.on_nonfinite == "stop":
                raise TrainingError(
                    f"{cfg.name}: {bad} became {checked[bad]} at step {step + 1}; stopped before updating the "
                    f"weights. The last good checkpoint is "
                    f"{latest_checkpoint(ckpt_dir) or 'none (no checkpoint was written yet)'}"
                )
            if bad is not None:  # on_nonfinite: skip -- no update; the schedule and the data stream move on
                optimizer.zero_grad(set_to_none=True)
                window.skipped += 1
                if info.is_main:
                    tqdm.write(f"{cfg.name}: {bad} became {checked[bad]} at step {step + 1}; step skipped")
            else:
                optimizer.step()
                window.losses.append(loss)
            scheduler.step()
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            last = done == cfg.steps
            evaluate = evaluator is not None and (
                (cfg.eval_every and done % cfg.eval_every == 0) or (last and (cfg.eval_every or cfg.eval_at_end))
            )
            if evaluate or done % cfg.log_every == 0 or last:  # a row per window and per evaluation
                elapsed = max(time.perf_counter() - window.start, 1e-9)
                counts = window.totals(info)
                row = {
                    "step": done,
                    # mean over the steps since the last row (skipped non-finite steps left out)
                    "loss": sum(window.losses) / len(window.losses) if window.losses else float("nan"),
                    "loss_last": loss,
                    "lr": scheduler.get_last_lr()[0],
                    **head_lr(),
                    "grad_norm": float(grad_norm),
                    "examples_per_s": counts["examples"] / elapsed,
                    "tokens_per_s": counts["tokens"] / elapsed,  # all ranks, pads left out
                    "skipped_steps": window.skipped,  # non-finite steps skipped in this window (on_nonfinite: skip)
                    **objective.row(counts),
                }
                if info.device.type == "cuda":  # this rank's peak since the stage began
                    row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                window.reset()
                if evaluate:
                    row.update(run_evaluation())
                log(row)
            if cfg.save_every and done % cfg.save_every == 0 and not last:
                save(done)
    bar.close()
    if latest is None or start < cfg.steps:
        save(cfg.steps)
    if is_fsdp(model) and holds_weights(module):
        load_model_weights(latest_checkpoint(ckpt_dir), module)  # the trained weights, unsharded
    if eval_group is not None:
        dist.destroy_process_group(eval_group)
    return history
