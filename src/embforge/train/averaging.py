"""Averaging the last k checkpoints of a training stage (``embforge merge --checkpoints``).

A checkpoint holds only the trained tensors (with LoRA: the adapters and the pooling head), so
each one is first made a whole model the way the stage's own final save does it: the model
its ``recipe.yaml`` describes, the checkpoint's tensors loaded over it, LoRA merged in float32,
saved at float32 in a temporary folder beside the output. The k folders are then averaged
tensor by tensor by :func:`embforge.models.merging.merge` (``linear``), so a LoRA run averages
its effective weights W + B·A·α/r, never A and B apart, and the result is cast once to the
recipe's ``save_dtype`` (or ``dtype``). Memory: one model (the rebuilt one) plus the merge's
row blocks; disk: k float32 copies while it runs, removed after.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from embforge.errors import ConfigError
from embforge.train.checkpoint import (
    checkpoint_folders,
    intact_checkpoints,
    load_model_weights,
    read_trainer_state,
)
from embforge.train.recipe import load_recipe


def checkpoints_of(run: str | Path) -> Path:
    """The ``checkpoints`` folder of a stage folder (``<output_dir>/01-<stage>``), or ``run`` itself."""
    run = Path(run)
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not checkpoint_folders(folder):
        raise ConfigError(
            f"{run}: no checkpoints (step-* folders) here or in {run / 'checkpoints'}; "
            "name a stage's folder, e.g. runs/recipe/01-stage1"
        )
    return folder


def last_checkpoints(run: str | Path, last: int) -> list[Path]:
    """The newest ``last`` intact checkpoints of ``run``, oldest first (a damaged one is skipped, with a warning)."""
    if last < 1:
        raise ConfigError(f"--last must be >= 1, got {last}")
    good = list(itertools.islice(intact_checkpoints(checkpoints_of(run)), last))[::-1]
    if len(good) < last:
        raise ConfigError(
            f"{run}: {last} checkpoints asked for, {len(good)} intact ones found "
            f"({', '.join(p.name for p in good) or 'none'}); save more often (save_every) or keep more "
            "(keep_last_checkpoints)"
        )
    return good


def average_checkpoints(
    run: str | Path,
    output: str | Path,
    *,
    last: int = 3,
    weights: list[float] | None = None,
    dtype: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Average the newest ``last`` checkpoints of a stage into the model folder ``output``.

    Args:
        run: the stage's folder (``<output_dir>/<nn>-<stage>``) or its ``checkpoints`` folder.
        last: how many of the newest intact checkpoints.
        weights: one per checkpoint, oldest first (normalised; default equal).
        dtype: of the result; None: the recipe's ``model.save_dtype``.

    Raises:
        ConfigError: too few checkpoints, checkpoints of different recipes' models, or a model the
            recipe names that cannot be found (run from the directory the training ran in).
    """
    from embforge.models.build import build_embedder
    from embforge.models.merging import merge

    chosen = last_checkpoints(run, last)
    if weights is not None and len(weights) != len(chosen):
        raise ConfigError(f"{len(weights)} weights for {len(chosen)} checkpoints")
    recipes = [load_recipe(c / "recipe.yaml")[0] for c in chosen]
    if any(r.model != recipes[-1].model for r in recipes):
        raise ConfigError(f"{run}: the checkpoints were written by recipes with different model blocks")
    recipe = recipes[-1]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.average-", dir=output.parent))
    try:
        embedder = build_embedder(recipe.model)
        target = embedder
        if read_trainer_state(chosen[-1]).get("objective") == "mlm":
            from embforge.train.mlm import mlm_model

            target = mlm_model(embedder)  # an mlm stage's checkpoints hold its MLM head too (not averaged out)
        folders = []
        for checkpoint in chosen:
            load_model_weights(checkpoint, target)
            folders.append(embedder.save(work / checkpoint.name, merge_lora=True, dtype="float32"))
        del embedder
        return merge(
            folders,
            output,
            method="linear",
            weights=weights,
            dtype=dtype or recipe.model.save_dtype,
            show_progress=show_progress,
            record={"models": [str(c) for c in chosen], "averaged_checkpoints": len(chosen)},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
