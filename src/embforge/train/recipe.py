"""The training recipe schema: one YAML file, a ``model`` block and ordered ``stages``.

Plain dataclasses (no torch), validated strictly by :func:`embforge.config.from_dict`:
unknown keys are errors with a did-you-mean suggestion, and ``--set`` overrides go
through the same checks (``--set stages.1.optim.lr=1e-5``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from embforge.config import PrecisionName, apply_overrides, from_dict, read_yaml
from embforge.errors import ConfigError
from embforge.models.presets import BACKBONE_PRESETS
from embforge.models.spec import ModelConfig
from embforge.train.mlm_recipe import MLMConfig, convert_old_mlm_recipe, is_old_mlm_recipe

DEFAULT_SHUFFLE_BUFFER = 10_000  # records a stream's shuffle buffer holds unless told


@dataclass
class DatasetConfig:
    name: str
    path: str  # JSONL file, glob of JSONL shards, or BEIR folder; relative to data_root
    # jsonl: training records {query, positive | positives, negatives?, source?, instruction?}; beir: a BEIR folder; classification / clustering / sts:
    # the raw task files, turned into contrastive examples (NV-Embed-v2's example-based approach)
    format: Literal["jsonl", "beir", "classification", "clustering", "sts"] = "jsonl"
    fields: dict[str, str] | None = None  # our field name -> the file's (jsonl: query/positive/negatives;
    # classification/clustering: text/label; sts: sentence1/sentence2/score)
    label_texts: dict[str, str] | None = None  # binary classification: label -> the text used as its document
    min_score: float = 4.0  # sts: pairs scored >= this are positives in both directions (NV-Embed-v2)
    split: str = "train"  # BEIR: qrels/<split>.tsv
    weight: float = 1.0  # sampling weight among the stage's datasets
    query_prompt: str = ""  # text prepended to queries, e.g. "search_query: "
    instruction: str | None = None  # task instruction -> query prompt through the model's instruction_template
    document_prompt: str = ""  # text prepended to positives and negatives
    # true: positives and negatives get the query's prompt too (its instruction through the model's
    # instruction_template, attended to and left out of pooling like the query's): symmetric tasks (STS)
    instruction_on_documents: bool = False
    in_batch_negatives: bool = True  # false: this dataset's queries see only their own documents
    num_negatives: int | None = None  # hard negatives per query for this dataset; None: the stage's
    # sts: "random": other sentences of the file, drawn seeded; "mined": the teacher's top-ranked other
    # sentences, positive-aware (NV-Embed-v2's TopK-PercPos: none scoring above max_score_ratio x the
    # positive's score), mined once when the stage builds its data
    negatives: Literal["random", "mined"] = "random"
    mining_model: str | None = None  # negatives: mined: the teacher (name or folder); None: the stage's starting model
    max_score_ratio: float = 0.95  # negatives: mined: drop candidates above this x the positive's score
    stream: bool = False  # read shards sequentially (memory independent of size) instead of loading
    shuffle_buffer: int | None = None  # stream: records shuffled in a seeded buffer of this size (0: file order;
    # default DEFAULT_SHUFFLE_BUFFER); streams only


@dataclass
class DataConfig:
    datasets: list[DatasetConfig]
    batch_size: int = 32  # queries per optimizer step and rank (before accumulation)
    num_negatives: int = 0  # hard negatives per query (records need at least this many)
    sampler: Literal["mixed", "proportional", "single_source"] = "mixed"
    no_duplicates: bool = True  # never two identical texts in one batch (false in-batch negatives)
    # a record with more negatives than num_negatives: a seeded sample of them each epoch (kept in the
    # list's order), or always its first num_negatives
    negative_sampling: Literal["sample", "first"] = "sample"
    # under torchrun: "global": every rank draws the same global batch and keeps its slice (R ranks train on
    # a 1-process run's batches; no text twice in the global batch); "own_share": rank r reads and parses only
    # its share of every dataset (lines r+1, r+1+R, ...) and draws its own batch_size from it (every rank
    # picks the same datasets per batch; duplicates kept out per rank, mask_duplicates covers the rest)
    rank_reading: Literal["global", "own_share"] = "global"
    # a bad JSONL line (not UTF-8 or JSON, a missing or mistyped field, an empty text, a positive among
    # the negatives): stop naming file:line, or skip it and count it by reason in the stage's data summary
    on_bad_record: Literal["error", "skip"] = "error"

    def negatives_of(self, dataset: DatasetConfig) -> int:
        """Hard negatives per query of ``dataset``: its own ``num_negatives``, else the stage's."""
        return self.num_negatives if dataset.num_negatives is None else dataset.num_negatives

    @property
    def max_negatives(self) -> int:
        """The most hard negatives a query of this stage has (every query's slots in the loss's layout)."""
        return max(self.negatives_of(d) for d in self.datasets)

    @property
    def mixed_negatives(self) -> bool:
        """Whether the stage's datasets differ in their number of hard negatives per query."""
        return len({self.negatives_of(d) for d in self.datasets}) > 1

    def reads_own_share(self, world: int) -> bool:
        """Whether each of ``world`` ranks reads its own share and draws its own batches."""
        return self.rank_reading == "own_share" and world > 1

    def validate(self, path: str) -> None:
        if not self.datasets:
            raise ConfigError(f"{path}.datasets: at least one dataset is needed")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.datasets: duplicate dataset names {names}")
        if self.batch_size < 1 or self.num_negatives < 0:
            raise ConfigError(f"{path}: batch_size must be >= 1 and num_negatives >= 0")
        if any(d.weight <= 0 for d in self.datasets):
            raise ConfigError(f"{path}.datasets: weights must be > 0")
        for i, d in enumerate(self.datasets):
            where = f"{path}.datasets.{i}"
            if d.num_negatives is not None and d.num_negatives < 0:
                raise ConfigError(f"{where}.num_negatives must be >= 0 (or null: the stage's {self.num_negatives})")
            if d.instruction_on_documents and (d.instruction is None or d.document_prompt):
                raise ConfigError(
                    f"{where}.instruction_on_documents: puts the dataset's instruction on the documents too; "
                    "it needs an instruction and no document_prompt"
                )
            if d.negatives == "mined" and d.format != "sts":
                raise ConfigError(f"{where}.negatives: mined applies to format: sts, not {d.format!r}")
            if d.negatives != "mined" and d.mining_model is not None:
                raise ConfigError(f"{where}.mining_model: applies to negatives: mined")
            if not 0 < d.max_score_ratio <= 1:
                raise ConfigError(f"{where}.max_score_ratio must be in (0, 1], got {d.max_score_ratio}")
            if d.shuffle_buffer is not None and (not d.stream or d.shuffle_buffer < 0):
                raise ConfigError(
                    f"{path}.datasets.{i}.shuffle_buffer: applies to streamed datasets (stream: true), "
                    f"as a count >= 0 (0 reads in file order); got {d.shuffle_buffer} with stream: {d.stream}"
                )


@dataclass
class DistillConfig:
    """Distillation from a teacher embedder: the student matches the teacher's embeddings and its
    in-batch similarity distributions (see :mod:`embforge.train.distill`)."""

    teacher: str  # a packaged model name or a folder (Embedder.load)
    query_prompt: str = ""  # the teacher's prompt on queries (its own, not the student's)
    document_prompt: str = ""  # the teacher's prompt on positives and negatives
    # the embedding term: 1 - cos(P·s, t) or the mean squared error of (P·s, t) per component;
    # P: a trainable linear map when the dimensions differ (a training aid, not part of the saved model)
    embedding: Literal["cosine", "mse", "none"] = "cosine"
    embedding_weight: float = 1.0
    kl_weight: float = 1.0  # KL(teacher ‖ student) of each query's softmax over its candidates; 0: off
    teacher_temperature: float | None = None  # τ of the teacher's softmax; None: the loss's temperature
    precision: PrecisionName = "auto"  # the teacher's inference precision
    batch_size: int = 64  # texts per teacher forward pass
    # teacher embeddings cache: <cache_dir>/<teacher digest>/; None: $EMBFORGE_CACHE/teacher-embeddings
    cache_dir: str | None = None

    def validate(self, path: str) -> None:
        if self.embedding_weight < 0 or self.kl_weight < 0:
            raise ConfigError(f"{path}: embedding_weight and kl_weight must be >= 0")
        if (self.embedding == "none" or not self.embedding_weight) and not self.kl_weight:
            raise ConfigError(f"{path}: both distillation terms are off (embedding: none / weight 0, kl_weight 0)")
        if self.teacher_temperature is not None and self.teacher_temperature <= 0:
            raise ConfigError(f"{path}.teacher_temperature must be > 0 (or null: the loss's temperature)")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size must be >= 1")


@dataclass
class LossConfig:
    temperature: float = 0.02  # NV-Embed does not publish τ; 0.02 is this family's usual value (Nomic: 0.02)
    in_batch_negatives: bool = True  # the stage switch (NV-Embed stage 2: false)
    symmetric: bool = False  # both directions: add the document -> query term
    same_tower: bool = (
        False  # in-batch negatives from the same side too: other queries (and, symmetric, other documents)
    )
    mask_duplicates: bool = True  # mask candidates whose text equals the positive
    # a candidate scoring above the positive + this margin is taken for an unlabelled positive and masked
    # (Qwen3-Embedding: 0.1); null: none is
    false_negative_margin: float | None = None
    hardness_weighting: float = 0.0  # β: a negative weighs n·softmax(β·s) among its query's n negatives; 0: all 1
    spread_out_weight: float = 0.0  # weight of the GOR spread-out regulariser over non-matching pairs; 0: off
    matryoshka_dims: list[int] = field(default_factory=list)  # e.g. [768, 512, 256, 128, 64]
    matryoshka_weights: list[float] | None = None
    contrastive_weight: float = 1.0  # weight of the InfoNCE term (and spread-out); 0: distillation alone
    distill: DistillConfig | None = None  # match a teacher too (see DistillConfig); None: no teacher

    def validate(self, path: str) -> None:
        if self.contrastive_weight < 0:
            raise ConfigError(f"{path}.contrastive_weight must be >= 0")
        if not self.contrastive_weight and self.distill is None:
            raise ConfigError(f"{path}.contrastive_weight: 0 leaves no loss without a distill block")
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature must be > 0")
        if self.false_negative_margin is not None and self.false_negative_margin < 0:
            raise ConfigError(f"{path}.false_negative_margin must be >= 0 (or null: no masking)")
        if self.hardness_weighting < 0 or self.spread_out_weight < 0:
            raise ConfigError(f"{path}: hardness_weighting and spread_out_weight must be >= 0")
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ConfigError(f"{path}: matryoshka_weights needs one weight per dim")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_fraction: float | None = None  # warm-up as a share of the stage's steps (instead of warmup_steps)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0  # 0 disables clipping
    # the pooling head's parameters (e.g. NV-Embed's latent attention, trained fully beside LoRA) in
    # their own AdamW groups: their peak LR and warm-up steps; None: the same as the rest
    head_lr: float | None = None
    head_warmup_steps: int | None = None

    @property
    def separate_head(self) -> bool:
        """Whether the pooling head has its own optimizer groups (head_lr or head_warmup_steps set)."""
        return self.head_lr is not None or self.head_warmup_steps is not None

    def resolved(self, steps: int) -> OptimConfig:
        """These settings with ``warmup_fraction`` turned into ``warmup_steps`` for a stage of ``steps``."""
        if self.warmup_fraction is None:
            return self
        return replace(self, warmup_steps=round(self.warmup_fraction * steps), warmup_fraction=None)

    def validate(self, path: str) -> None:
        if self.warmup_fraction is not None:
            if not 0 <= self.warmup_fraction < 1:
                raise ConfigError(f"{path}.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
            if self.warmup_steps:
                raise ConfigError(f"{path}: set warmup_fraction or warmup_steps, not both")
        if self.warmup_steps < 0 or (self.head_warmup_steps is not None and self.head_warmup_steps < 0):
            raise ConfigError(f"{path}: warmup_steps and head_warmup_steps must be >= 0")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"{path}.head_lr must be > 0 (or null: the same as lr)")


@dataclass
class StageConfig:
    name: str
    steps: int
    # contrastive: pairs and negatives through the pooling head (needs `data`); mlm: masked-token
    # prediction on packed text through the backbone (a nomic-bert; needs `mlm`)
    objective: Literal["contrastive", "mlm"] = "contrastive"
    data: DataConfig | None = None  # objective: contrastive
    mlm: MLMConfig | None = None  # objective: mlm
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_accum_steps: int = 1
    grad_cache_chunk: int = 0  # > 0: GradCache with this many texts per forward pass
    precision: PrecisionName = "auto"  # auto: bf16 autocast where the device supports it
    log_every: int = 10
    save_every: int = 0  # 0: checkpoint only at the end of the stage
    keep_last_checkpoints: int = 3  # the newest checkpoints kept (plus the best one); 0: keep every checkpoint
    best_metric: str | None = None  # "eval/<task>", higher is better; null: the mean of the eval/ scores
    eval_every: int = 0  # 0: no evaluation during the stage
    eval_tasks: str | None = None  # task file (relative to data_root)
    eval_only: list[str] | None = None  # task names inside it
    # multi-process: how long the other ranks wait for rank 0's evaluation (the process group's own
    # timeout, 10 min for nccl and 30 for gloo, would end the run during a long one)
    eval_timeout_s: float = 6 * 3600
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/Inf loss or gradient: stop the run, or skip the step

    def validate(self, path: str) -> None:
        if self.objective == "contrastive" and (self.data is None or self.mlm is not None):
            raise ConfigError(f"{path}: a contrastive stage needs a data block and no mlm block")
        if self.objective == "mlm":
            contrastive_only = {"data": self.data is not None, "loss": self.loss != LossConfig()}
            contrastive_only.update(grad_cache_chunk=bool(self.grad_cache_chunk), eval_tasks=bool(self.eval_tasks))
            contrastive_only.update(eval_only=self.eval_only is not None, best_metric=bool(self.best_metric))
            contrastive_only.update(grad_accum_steps=self.grad_accum_steps != 1)
            contrastive_only["optim.head_lr / head_warmup_steps"] = self.optim.separate_head  # no pooling head trains
            wrong = [k for k, v in contrastive_only.items() if v]
            if self.mlm is None or wrong:
                raise ConfigError(
                    f"{path}: an mlm stage needs an mlm block (files, batch_size, ...)"
                    + (f" and takes no {', '.join(wrong)} (contrastive settings)" if wrong else "")
                    + "; its evaluation is the masked-token accuracy on the held-back text"
                )
        if self.steps < 1 or self.grad_accum_steps < 1 or self.grad_cache_chunk < 0 or self.log_every < 1:
            raise ConfigError(f"{path}: steps, grad_accum_steps and log_every must be >= 1, grad_cache_chunk >= 0")
        if self.eval_every and not self.eval_tasks and self.objective == "contrastive":
            raise ConfigError(f"{path}: eval_every needs eval_tasks")
        if self.eval_timeout_s <= 0:
            raise ConfigError(f"{path}.eval_timeout_s must be > 0")
        if self.keep_last_checkpoints < 0:
            raise ConfigError(f"{path}.keep_last_checkpoints must be >= 0 (0 keeps every checkpoint)")
        if self.best_metric is not None and not self.best_metric.startswith("eval/"):
            raise ConfigError(f"{path}.best_metric must name an evaluation score, e.g. 'eval/SICK-R'")


@dataclass
class RecipeConfig:
    model: ModelConfig
    stages: list[StageConfig]
    output_dir: str = "runs/recipe"
    data_root: str = "."  # dataset paths are relative to this (itself relative to the recipe file)
    seed: int = 0
    parallel: Literal["ddp", "fsdp"] = "ddp"  # used when launched by torchrun with > 1 process

    def validate(self, path: str) -> None:
        where = path or "recipe"
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"{where}.stages: need at least one stage, with unique names; got {names}")
        preset = BACKBONE_PRESETS.get(self.model.name_or_path)
        mlm_stages = [i for i, s in enumerate(self.stages) if s.objective == "mlm"]
        if mlm_stages and self.parallel != "ddp":
            raise ConfigError(
                f"{where}.parallel: mlm stages (stages.{mlm_stages[0]}) run under ddp, not {self.parallel}"
            )
        if mlm_stages and preset is not None and preset.family != "nomic_bert":
            raise ConfigError(
                f"{where}.stages.{mlm_stages[0]}: an mlm stage trains a nomic-bert; {self.model.name_or_path!r} "
                f"is a {preset.family} preset"
            )
        if preset is not None and self.model.tokenizer is not None and self.model.lora is not None:
            raise ConfigError(
                f"{where}.model.lora: {self.model.name_or_path!r} is built with random weights here; LoRA would "
                "train adapters on a frozen random backbone (train it fully, or start from trained weights)"
            )
        if preset is not None and preset.family == "nomic_bert":  # check the fields and the chunk length now
            from embforge.models.nomic_bert_config import from_name

            try:
                spec = from_name(self.model.name_or_path, **(self.model.preset_overrides or {}))
            except ConfigError as exc:
                raise ConfigError(f"{where}.model: {exc}") from exc
            for i, stage in enumerate(self.stages):
                if stage.mlm is not None and stage.mlm.chunk_len > spec.max_trained_len:
                    raise ConfigError(
                        f"{where}.stages.{i}.mlm.chunk_len {stage.mlm.chunk_len} exceeds the model's "
                        f"max_trained_len {spec.max_trained_len}"
                    )


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped inside the package, e.g. ``recipe_path("quickstart/stdlib_two_stage.yaml")``."""
    return Path(str(resources.files("embforge") / "recipes" / name))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[RecipeConfig, Path]:
    """Read a recipe strictly; return it and the resolved data root.

    A file in the pre-0.2 MLM layout (``objective: mlm`` at the top) is read as a one-stage recipe
    (with a FutureWarning saying how to update it); ``overrides`` apply to the file as written.
    """
    path = Path(path)
    try:
        raw = apply_overrides(read_yaml(path), overrides)
        if is_old_mlm_recipe(raw):
            raw = convert_old_mlm_recipe(raw, str(path))
        recipe = from_dict(RecipeConfig, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    root = Path(recipe.data_root)
    return recipe, (root if root.is_absolute() else path.parent / root).resolve()
