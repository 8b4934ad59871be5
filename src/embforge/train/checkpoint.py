"""Checkpoints that are never half-written, are checked before use, and resume the exact trajectory.

A checkpoint is a folder ``checkpoints/step-00000010/`` holding

    model.safetensors    the trainable tensors of the Embedder (frozen ones never change)
    optimizer.pt         optimizer state (torch.save of tensors and plain containers only)
    trainer_state.json   step, scheduler state, data-stream position (sampler state), eval scores
    rng.pt               torch (CPU + CUDA), numpy and Python RNG states (tensors and plain types)
    recipe.yaml          the resolved recipe this run used
    manifest.json        size and SHA-256 of every file above, written last

Under FSDP with more than one rank, ``model.safetensors`` and ``optimizer.pt`` are replaced by
``sharded/``, a ``torch.distributed.checkpoint`` save of the same trainable tensors and optimizer
state: one ``__<rank>_0.distcp`` file per rank holding that rank's shards, and ``.metadata``, the
index of which file holds which slice (:func:`save_sharded_checkpoint`). No rank gathers the full
state to write it, nor to read it back (:func:`~embforge.train.sharded_checkpoint.load_sharded_states`), and a checkpoint written by
N ranks loads on M (each reads the slices its own shards need). Every rank writes into the one
temporary folder; rank 0 adds the other files and the manifest, over the shards too, and renames.

It is written by :func:`embforge.atomic.atomic_folder` (temporary folder, fsync, manifest,
rename), so a crash mid-write -- ``kill -9`` included -- leaves the previous checkpoint as
the latest one. :func:`latest_checkpoint` checks the manifest of each candidate, newest
first: a damaged one (manifest missing or not matching) is reported with a warning that
names it and why, and the previous good one is used. The ``.pt`` files are read with
``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle is refused.

Retention (:func:`prune_checkpoints`): the newest ``keep_last`` plus the best one by an
evaluation score.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from embforge.atomic import (
    atomic_folder,
    atomic_write,
    check_writable,
    folder_problem,
    remove_folder,
    remove_stale_temporaries,
)
from embforge.errors import CheckpointError
from embforge.models.saving import own_tensors
from embforge.train.schedule import restore_scheduler
from embforge.train.sharded_checkpoint import SHARDED, check_model_keys, load_sharded_states

_PREFIX = "step-"


def _rng_state() -> dict:
    """Every RNG state as tensors and plain Python values (loadable with ``weights_only=True``)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(rng["python"])


def _write_training_files(tmp: Path, step: int, scheduler, trainer_state: dict, recipe: dict, metrics) -> None:
    state = {"step": step, "scheduler": scheduler.state_dict(), **trainer_state, "metrics": metrics or {}}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def save_checkpoint(
    folder: Path,
    step: int,
    model_state: dict,
    optim_state: dict,
    scheduler,
    trainer_state: dict,
    recipe: dict,
    *,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write checkpoint ``folder/step-<step>`` atomically, with its manifest; return its path.

    Args:
        model_state / optim_state: full (unsharded) state dicts, see ``parallel.full_model_state``.
        metrics: evaluation scores at this step (``eval/<task>``), used to keep the best checkpoint.

    Raises:
        SaveError: disk full or folder not writable; the checkpoints already there are untouched.
    """
    with atomic_folder(folder / f"{_PREFIX}{step:08d}") as tmp:
        save_file(own_tensors(model_state), str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        _write_training_files(tmp, step, scheduler, trainer_state, recipe, metrics)
    return folder / f"{_PREFIX}{step:08d}"


def save_sharded_checkpoint(
    folder: Path,
    step: int,
    states: dict,
    scheduler,
    trainer_state: dict,
    recipe: dict,
    *,
    metrics: dict[str, float] | None = None,
) -> Path:
    """:func:`save_checkpoint` with the model and optimizer state sharded: a collective, call it on every rank.

    Rank 0 opens the temporary folder and tells the others its name; every rank writes its own
    shards into ``sharded/`` (``torch.distributed.checkpoint``, which also writes the index);
    then rank 0 writes the other files (its scheduler, trainer and RNG states) and the manifest
    over all of them, and renames the folder into place. The folder must be on storage every
    rank sees (one machine, or a shared file system).

    Args:
        states: ``{"model": ..., "optimizer": ...}`` of this rank, see ``parallel.sharded_states``.
        trainer_state / recipe / metrics: as for :func:`save_checkpoint` (rank 0's are written).

    Raises:
        SaveError: on rank 0, disk full or folder not writable; the checkpoints already there are untouched.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = folder / f"{_PREFIX}{step:08d}"
    main = dist.get_rank() == 0
    with atomic_folder(path) if main else contextlib.nullcontext() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)  # the temporary folder rank 0 made
        dcp.save(states, storage_writer=dcp.FileSystemWriter(shared[0] / SHARDED))  # returns once all are written
        if main:
            _write_training_files(tmp, step, scheduler, trainer_state, recipe, metrics)
    dist.barrier()  # the checkpoint is in place (or rank 0 raised) before any rank goes on
    return path


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written under FSDP (:func:`save_sharded_checkpoint`)."""
    return (path / SHARDED).is_dir()


def checkpoint_folders(folder: Path) -> list[Path]:
    """Every ``step-*`` folder in ``folder``, oldest first, checked or not (temporary folders are hidden)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def ready_checkpoint_dir(folder: Path) -> None:
    """Before a run's first step: fail now if ``folder`` is not writable (not at the first save),
    and clear what a killed run left half-written there. One process per folder (rank 0)."""
    check_writable(folder)
    remove_stale_temporaries(folder)


def resume_point(folder: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from: the newest good one with ``resume``, else None.

    Raises:
        CheckpointError: ``resume`` is off and ``folder`` holds an earlier run's checkpoints.
    """
    if not resume:
        if checkpoint_folders(folder):
            raise CheckpointError(
                f"{folder} already holds checkpoints of an earlier run; resume, or choose another output_dir "
                "(embforge never deletes them for you)"
            )
        return None
    return latest_checkpoint(folder)


def intact_checkpoints(folder: Path) -> Iterator[Path]:
    """The checkpoints in ``folder`` whose files match their manifest, newest first, checked as they are asked for.

    A damaged checkpoint (manifest missing, a file missing, truncated or changed) is
    skipped with a warning naming it and why; the previous one is tried next.
    """
    for path in reversed(checkpoint_folders(folder)):
        problem = folder_problem(path)
        if problem is None:
            yield path
        else:
            warnings.warn(f"checkpoint {path} is damaged ({problem}); using the previous one", stacklevel=3)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest intact checkpoint in ``folder`` (see :func:`intact_checkpoints`), if any."""
    return next(intact_checkpoints(folder), None)


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.json``: step, scheduler, data position, objective, eval scores."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def _score(path: Path, metric: str | None) -> float | None:
    try:
        metrics = read_trainer_state(path).get("metrics", {})
    except (OSError, ValueError):
        return None
    if metric is not None:
        return metrics.get(metric)
    evals = [v for k, v in metrics.items() if k.startswith("eval/")]
    return sum(evals) / len(evals) if evals else None


def best_checkpoint(folder: Path, metric: str | None = None) -> Path | None:
    """The checkpoint with the highest ``metric`` (None: the mean of its ``eval/*`` scores), if any has one."""
    scored = [(s, p) for p in checkpoint_folders(folder) if (s := _score(p, metric)) is not None]
    return max(scored, key=lambda sp: sp[0])[1] if scored else None


def prune_checkpoints(folder: Path, keep_last: int, best_metric: str | None = None) -> list[Path]:
    """Delete all checkpoints but the newest ``keep_last`` and the best one; return those deleted.

    ``keep_last`` 0 keeps every checkpoint. A deletion interrupted by a crash leaves a
    hidden temporary folder, never a partial checkpoint.
    """
    found = checkpoint_folders(folder)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    keep = set(found[-keep_last:]) | {best_checkpoint(folder, best_metric)}
    doomed = [p for p in found if p not in keep]
    for path in doomed:
        remove_folder(path)
    return doomed


# tensors a stage trains beside the model and keeps in its checkpoints, never in a saved model (the
# distillation projection, embforge.train.distill): loading a checkpoint into a model leaves them out
STAGE_ONLY = "stage_only."


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's model tensors: every trainable parameter must be there, nothing else may be.

    Checkpoints hold the trained tensors only (with LoRA: the adapters and the pooling head,
    not the frozen base); frozen parameters keep the values the model was built with. From a
    sharded checkpoint this process reads every shard of the model's tensors (not the optimizer's),
    without the other ranks: it is how rank 0's unsharded copy gets the trained weights.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if is_sharded(path):
        current = model.state_dict()
        states = {"model": {k: current[k] for k in trainable}}
        load_sharded_states(path, states, no_dist=True)
        model.load_state_dict(states["model"], strict=False)
        return
    file = path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no model.safetensors")
    state = {k: v for k, v in load_file(str(file)).items() if not k.startswith(STAGE_ONLY)}
    check_model_keys(path, set(state), trainable, set(model.state_dict()))
    model.load_state_dict(state, strict=False)


def load_stage_only(path: Path, module: torch.nn.Module, prefix: str) -> None:
    """Load ``module`` from a checkpoint's ``<prefix>*`` tensors (a stage's training aid, see ``STAGE_ONLY``)."""
    state = {k[len(prefix) :]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(prefix)}
    if set(state) != set(module.state_dict()):
        raise CheckpointError(
            f"checkpoint {path} does not match this stage: {prefix}* holds {sorted(state)}, "
            f"expected {sorted(module.state_dict())}"
        )
    module.load_state_dict(state)


def _load_tensors_only(file: Path):
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} holds more than tensors and plain containers; refused (it is loaded with weights_only=True): "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def load_training_state(path: Path, load_optimizer, scheduler) -> dict:
    """Restore optimizer (through ``load_optimizer(state_dict)``), scheduler and RNG states.

    The model weights are loaded separately (:func:`load_model_weights`), before the model
    is wrapped for DDP/FSDP; from a sharded checkpoint, weights and optimizer state both are
    (:func:`load_sharded_states`): pass ``load_optimizer=None`` then. Returns the trainer state
    (step, data position, ...).
    """
    needed = (
        ("optimizer.pt", "trainer_state.json", "rng.pt")
        if load_optimizer is not None
        else ("trainer_state.json", "rng.pt")
    )
    for name in needed:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    if load_optimizer is not None:
        load_optimizer(_load_tensors_only(path / "optimizer.pt"))
    state = read_trainer_state(path)
    restore_scheduler(scheduler, state["scheduler"])
    _set_rng_state(_load_tensors_only(path / "rng.pt"))
    return state


def resume_log(log_file: Path, start: int, *, rewrite: bool = True) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to step ``start`` (the checkpoint resumed from); rewrite the file to them.

    Rows past the checkpoint are dropped, and so is a last line cut short by a crash
    mid-append (any other malformed line is an error).
    """
    history = []
    if start and log_file.is_file():
        lines = [line for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                history.append(json.loads(line))
            except ValueError as exc:
                if i < len(lines) - 1:
                    raise CheckpointError(f"{log_file}:{i + 1}: not JSON ({exc})") from exc
        history = [h for h in history if h["step"] <= start]
    if rewrite:
        atomic_write(log_file, lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in history)))
    return history
