"""The MLM pre-training recipe schema (``objective: mlm``): plain dataclasses, no torch.

Read strictly like the contrastive recipes (unknown keys are errors with a did-you-mean,
``--set`` overrides get the same checks)::

    recipe, data_root = load_recipe("cpu_mlm.yaml", ["steps=10"], schema=MLMRecipeConfig)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from embforge.errors import ConfigError
from embforge.models.nomic_bert_config import from_name
from embforge.train.recipe import OptimConfig


@dataclass
class MLMModelConfig:
    preset: str = "nomic-bert-2048"  # a preset of embforge.models.nomic_bert_config
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to replace (num_layers: 4, ...)
    tokenizer: str = "all-MiniLM-L6-v2"  # bert-base-uncased WordPiece: a known model name or a folder


@dataclass
class MLMDataConfig:
    files: list[str]  # text files (globs allowed), relative to data_root
    format: Literal["wikitext", "text", "jsonl"] = "text"
    text_field: str = "text"  # jsonl: the field holding the text
    chunk_len: int = 2048  # tokens per packed chunk, [CLS] and [SEP] included
    heldout_fraction: float = 0.01  # the last documents, held back for masked-token accuracy
    heldout_max_chunks: int = 0  # evaluate on at most this many held-back chunks (0: all)
    mask_prob: float = 0.3
    eval_mask_prob: float | None = None  # None: mask_prob

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


@dataclass
class MLMRecipeConfig:
    objective: Literal["mlm"]
    model: MLMModelConfig
    data: MLMDataConfig
    steps: int
    batch_size: int  # chunks per optimizer step
    micro_batch_size: int = 0  # chunks per forward pass, gradients accumulated (0: batch_size)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup_fraction: float | None = None  # warm-up as a share of steps (replaces optim.warmup_steps)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/Inf loss or gradient: stop the run, or skip the step
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate before training and at the end only
    eval_batch_size: int = 32
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last_checkpoints: int = 3  # the newest checkpoints kept (plus the best eval/masked_acc); 0: keep all
    output_dir: str = "runs/mlm"
    data_root: str = "."  # relative to the recipe file
    seed: int = 0

    def validate(self, path: str) -> None:
        where = path or "recipe"
        if self.steps < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.log_every < 1:
            raise ConfigError(f"{where}: steps, batch_size, eval_batch_size and log_every must be >= 1")
        if self.keep_last_checkpoints < 0:
            raise ConfigError(f"{where}.keep_last_checkpoints must be >= 0 (0 keeps every checkpoint)")
        if self.micro_batch_size < 0 or self.micro_batch_size > self.batch_size:
            raise ConfigError(f"{where}.micro_batch_size must be in [0, batch_size], got {self.micro_batch_size}")
        if self.warmup_fraction is not None:
            if not 0 <= self.warmup_fraction < 1:
                raise ConfigError(f"{where}.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
            if self.optim.warmup_steps:
                raise ConfigError(f"{where}: set warmup_fraction or optim.warmup_steps, not both")
        try:
            spec = from_name(self.model.preset, **self.model.overrides)
        except ConfigError as exc:
            raise ConfigError(f"{where}.model: {exc}") from exc
        if self.data.chunk_len > spec.max_trained_len:
            raise ConfigError(
                f"{where}.data.chunk_len {self.data.chunk_len} exceeds the model's max_trained_len {spec.max_trained_len}"
            )

    @property
    def warmup_steps(self) -> int:
        if self.warmup_fraction is None:
            return self.optim.warmup_steps
        return round(self.warmup_fraction * self.steps)
