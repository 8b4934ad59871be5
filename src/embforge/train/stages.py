"""Run a multi-stage recipe: each stage starts from the previous stage's weights."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from embforge.atomic import check_writable
from embforge.config import to_dict
from embforge.errors import ConfigError
from embforge.models.build import build_embedder
from embforge.models.embedder import Embedder
from embforge.train.checkpoint import latest_checkpoint, load_model_weights
from embforge.train.contrastive import train_stage
from embforge.train.mlm import mlm_model, train_mlm_stage
from embforge.train.parallel import DistInfo, barrier, build_device, holds_weights, init_distributed
from embforge.train.recipe import RecipeConfig


def stage_dirs(recipe: RecipeConfig) -> list[Path]:
    return [Path(recipe.output_dir) / f"{i + 1:02d}-{s.name}" for i, s in enumerate(recipe.stages)]


def _evaluator(stage, data_root: Path):
    if not stage.eval_tasks:
        return None
    from embforge.eval.runner import load_suite, main_scores, run_suite

    suite, root = load_suite(data_root / stage.eval_tasks)
    return lambda model: main_scores(run_suite(model, suite, root, batch_size=64, only=stage.eval_only))


def save_model(embedder: Embedder, recipe: RecipeConfig, folder: Path) -> Path:
    """Save as the recipe says: LoRA merged (in float32) or kept as an adapter, weights in ``model.save_dtype``."""
    lora = recipe.model.lora
    return embedder.save(folder, merge_lora=lora.merge_on_save if lora else True, dtype=recipe.model.save_dtype)


def run_recipe(
    recipe: RecipeConfig,
    data_root: Path,
    *,
    resume: bool = True,
    info: DistInfo | None = None,
    device: str | None = None,
) -> Embedder:
    """Train every stage in order and save ``<output_dir>/final`` (a sentence-transformers folder).

    A stage trains its ``objective``: ``contrastive`` (:func:`~embforge.train.contrastive.train_stage`)
    or ``mlm`` (:func:`~embforge.train.mlm.train_mlm_stage`, the backbone with a new MLM head), so
    MLM → contrastive → fine-tune is one recipe.

    With ``resume``, finished stages are skipped (their final checkpoint is loaded) and an
    unfinished stage continues from its newest checkpoint. Each stage continues from the
    previous one's weights in memory (trained tensors in float32), so stage 2 starts exactly
    where stage 1 ended; a recipe that starts from another recipe's saved folder gets the same
    handoff when that folder kept its LoRA adapter (``lora.merge_on_save: false``).
    """
    info = info or init_distributed()
    if device is not None:
        if info.world > 1:
            raise ConfigError("--device applies to one process; under torchrun each rank uses its own device")
        info = dataclasses.replace(info, device=torch.device(device))
    if info.is_main:
        check_writable(recipe.output_dir)  # fail before any training, not at the first save
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    embedder = build_embedder(recipe.model, device=info.device if device else build_device(info, recipe.parallel))
    recipe_dict = to_dict(recipe)
    histories: dict[str, list[dict]] = {}
    for i, (stage, folder) in enumerate(zip(recipe.stages, stage_dirs(recipe))):
        latest = latest_checkpoint(folder / "checkpoints") if resume else None
        if latest is not None and latest.name == f"step-{stage.steps:08d}":
            if holds_weights(embedder):  # an FSDP rank > 0 holds a meta model
                # this stage already finished (an mlm stage's checkpoint holds the backbone and its MLM head)
                load_model_weights(latest, mlm_model(embedder) if stage.objective == "mlm" else embedder)
            continue
        where = dict(data_root=data_root, stage_dir=folder, recipe_dict=recipe_dict, info=info)
        where.update(seed=recipe.seed + 1000 * i, parallel=recipe.parallel, resume=resume)
        if stage.objective == "mlm":
            histories[stage.name] = train_mlm_stage(embedder, stage, **where)
        else:
            histories[stage.name] = train_stage(embedder, stage, evaluator=_evaluator(stage, data_root), **where)
        if info.is_main:
            save_model(embedder, recipe, folder / "model")
        barrier()
    if info.is_main:
        save_model(embedder, recipe, Path(recipe.output_dir) / "final")
        if any(histories.values()):
            from embforge.train.plots import plot_history

            plot_history(histories, Path(recipe.output_dir) / "curves.png")
    barrier()
    return embedder
