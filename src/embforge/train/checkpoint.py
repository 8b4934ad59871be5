"""Checkpoints that are never half-written and resume the exact trajectory.

A checkpoint is a folder ``checkpoints/step-00000010/`` holding

    model.safetensors    the trainable tensors of the Embedder (frozen ones never change)
    optimizer.pt         optimizer state (torch.save; tensors of arbitrary structure)
    trainer_state.json   step, scheduler state, data-stream position (sampler state)
    rng.pt               torch (CPU + CUDA), numpy and Python RNG states
    recipe.yaml          the resolved recipe this run used

It is written into a temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from embforge.errors import CheckpointError

_PREFIX = "step-"


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): clone makes every tensor its own
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_checkpoint(
    folder: Path, step: int, model_state: dict, optim_state: dict, scheduler, trainer_state: dict, recipe: dict
) -> Path:
    """Write checkpoint ``folder/step-<step>`` atomically; return its path.

    Args:
        model_state / optim_state: full (unsharded) state dicts, see ``parallel.full_states``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        save_file(_cpu_tensors(model_state), str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        state = {"step": step, "scheduler": scheduler.state_dict(), **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        torch.save(rng, tmp / "rng.pt")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary folders are ignored)."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    return found[-1] if found else None


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors``: every trainable parameter must be there, nothing else may be.

    Checkpoints hold the trained tensors only (with LoRA: the adapters and the pooling head,
    not the frozen base); frozen parameters keep the values the model was built with.
    """
    file = path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no model.safetensors")
    state = load_file(str(file))
    known = set(model.state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - known)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)


def load_training_state(path: Path, load_optimizer, scheduler) -> dict:
    """Restore optimizer (through ``load_optimizer(state_dict)``), scheduler and RNG states.

    The model weights are loaded separately (:func:`load_model_weights`), before the model
    is wrapped for DDP/FSDP. Returns the trainer state (step, data position, ...).
    """
    for name in ("optimizer.pt", "trainer_state.json", "rng.pt"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    load_optimizer(torch.load(path / "optimizer.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state
