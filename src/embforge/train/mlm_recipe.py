"""An MLM stage's settings (``objective: mlm``, its ``mlm:`` block), and the conversion of the
pre-0.2 MLM recipe files (a top-level ``objective: mlm``) into the one recipe schema.

An MLM stage is a stage of an ordinary recipe (:class:`~embforge.train.recipe.RecipeConfig`), so
MLM → contrastive → fine-tune is one file and one ``embforge train``::

    model: {name_or_path: nomic-bert-2048, preset_overrides: {num_layers: 4}, tokenizer: all-MiniLM-L6-v2}
    stages:
      - {name: mlm, objective: mlm, steps: 300, mlm: {files: [wikitext2/wiki.valid.tokens], batch_size: 32}}
      - {name: contrastive, steps: 60, data: {...}}

Plain dataclasses, no torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embforge.errors import ConfigError


@dataclass
class MLMConfig:
    """What an MLM stage reads and how it masks and batches it (Nomic Embed §4.1)."""

    files: list[str]  # text files (globs allowed), relative to data_root
    batch_size: int  # chunks per optimizer step (all ranks together)
    micro_batch_size: int = 0  # chunks per forward pass, gradients accumulated (0: a rank's whole share)
    format: Literal["wikitext", "text", "jsonl"] = "text"
    text_field: str = "text"  # jsonl: the field holding the text
    chunk_len: int = 2048  # tokens per packed chunk, [CLS] and [SEP] included
    heldout_fraction: float = 0.01  # the last documents, held back for masked-token accuracy
    heldout_max_chunks: int = 0  # evaluate on at most this many held-back chunks (0: all)
    mask_prob: float = 0.3
    eval_mask_prob: float | None = None  # None: mask_prob
    eval_batch_size: int = 32  # chunks per forward pass when scoring the held-back slice

    def validate(self, path: str) -> None:
        if not self.files:
            raise ConfigError(f"{path}.files: at least one file is needed")
        for key in ("mask_prob", "eval_mask_prob"):
            value = getattr(self, key)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{path}.{key} must be in (0, 1), got {value}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"{path}.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.chunk_len < 8 or self.heldout_max_chunks < 0:
            raise ConfigError(f"{path}: chunk_len must be >= 8 and heldout_max_chunks >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"{path}: batch_size and eval_batch_size must be >= 1")
        if not 0 <= self.micro_batch_size <= self.batch_size:
            raise ConfigError(f"{path}.micro_batch_size must be in [0, batch_size], got {self.micro_batch_size}")


# the old layout's keys, by where they go: the stage's own fields, the mlm block, the run's fields
_STAGE_KEYS = ("steps", "optim", "precision", "on_nonfinite", "log_every", "eval_every", "save_every")
_STAGE_KEYS += ("keep_last_checkpoints",)
_MLM_KEYS = ("batch_size", "micro_batch_size", "eval_batch_size")
_RUN_KEYS = ("output_dir", "data_root", "seed")
_MODEL_KEYS = {"preset": "name_or_path", "overrides": "preset_overrides", "tokenizer": "tokenizer"}


def is_old_mlm_recipe(raw: dict) -> bool:
    """Whether ``raw`` is a recipe in the pre-0.2 MLM layout (``objective: mlm`` at the top)."""
    return isinstance(raw, dict) and "objective" in raw


def convert_old_mlm_recipe(raw: dict, where: str) -> dict:
    """The pre-0.2 MLM layout as a one-stage recipe of the current schema (warns, naming the file).

    ``model: {preset, overrides, tokenizer}`` becomes ``model: {name_or_path, preset_overrides,
    tokenizer}``; ``data`` and the batch sizes become the stage's ``mlm:`` block; ``warmup_fraction``
    becomes ``optim.warmup_fraction``; the stage is named ``mlm``. Keys that do not belong to the old
    layout are errors (the strict reading of the converted recipe names them).
    """
    if raw.get("objective") != "mlm":
        raise ConfigError(f"objective: {raw.get('objective')!r} at the top level; objective is a stage's field")
    if "stages" in raw:
        raise ConfigError(
            "a pre-0.2 MLM recipe (top-level objective: mlm) with a stages key: write --set overrides "
            "against the file's own layout (steps=..., data.chunk_len=...), or update the file to the stages layout"
        )
    old = {k: v for k, v in raw.items() if k != "objective"}
    model_old = dict(old.pop("model", None) or {})
    model = {new: model_old.pop(key) for key, new in _MODEL_KEYS.items() if key in model_old}
    model.setdefault("name_or_path", "nomic-bert-2048")  # the old layout's defaults
    model.setdefault("tokenizer", "all-MiniLM-L6-v2")
    model.update(model_old)  # anything else: reported by the strict reading
    stage: dict = {"name": "mlm", "objective": "mlm"}
    stage.update({k: old.pop(k) for k in _STAGE_KEYS if k in old})
    mlm = dict(old.pop("data", None) or {})
    mlm.update({k: old.pop(k) for k in _MLM_KEYS if k in old})
    stage["mlm"] = mlm
    if "warmup_fraction" in old:
        stage["optim"] = {**(stage.get("optim") or {}), "warmup_fraction": old.pop("warmup_fraction")}
    recipe = {"model": model, "stages": [stage], **{k: old.pop(k) for k in _RUN_KEYS if k in old}}
    recipe.setdefault("output_dir", "runs/mlm")
    old_checkpoints = Path(str(recipe["output_dir"])) / "checkpoints"
    if old_checkpoints.is_dir() and any(old_checkpoints.iterdir()):
        raise ConfigError(
            f"{old_checkpoints} holds checkpoints of the pre-0.2 MLM layout; the stage now keeps them in "
            f"{old_checkpoints.parent / '01-mlm' / 'checkpoints'}: move the folder there to resume the run"
        )
    recipe.update(old)  # unknown keys: reported by the strict reading
    warnings.warn(
        f"{where}: an MLM recipe in the pre-0.2 layout (top-level objective: mlm), read as a one-stage recipe; "
        "update it to `model: {name_or_path: <preset>, preset_overrides: {...}, tokenizer: ...}` and "
        "`stages: [{name: mlm, objective: mlm, steps, optim, mlm: {files, batch_size, ...}}]` "
        "(docs/training.md, 'MLM pre-training'); its model is now saved to <output_dir>/final",
        FutureWarning,
        stacklevel=3,
    )
    return recipe
