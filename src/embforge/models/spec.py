"""The recipe's ``model:`` block: backbone, attention, pooling head, prompts, LoRA, dtype.

Plain dataclasses (no torch), read strictly by :func:`embforge.config.from_dict`. The
one function that turns a spec into a model is :func:`embforge.models.build.build_embedder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from embforge.modeling.head import (
    PARAMETER_FREE_POOLINGS,
    AttentionName,
    HeadInit,
    MatryoshkaRule,
    PaddingSide,
    PoolingName,
)

# LoRA targets of the Llama/Mistral/Qwen families: every attention and MLP projection
DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PoolingConfig:
    """A pooling and its own sizes (only the attention poolings have sizes).

    A size left out (None) takes the loaded folder's trained head's value, or for a new head
    the default in the comment (see :mod:`embforge.models.heads`).
    """

    name: PoolingName = "mean"
    num_latents: int | None = None  # default 512: NV-Embed's latents (arXiv 2405.17428 §3.2)
    num_heads: int | None = None  # default 8: NV-Embed's heads
    head_dim: int | None = None  # default: the hidden size (NV-Embed's released 8 x 4096); 64-128 for small backbones
    mlp_ratio: int | None = None  # default 4: GEGLU feed-forward width, x hidden size
    # a new head starts randomly initialised, or as exactly mean pooling (its output projections zero)
    init: HeadInit | None = None

    def as_dict(self) -> dict:
        """The pooler's settings that are set (see ``embforge.modeling.pooling.build_pooler``)."""
        if self.name in PARAMETER_FREE_POOLINGS:
            return {"name": self.name}
        sizes = {"num_heads": self.num_heads, "head_dim": self.head_dim, "mlp_ratio": self.mlp_ratio, "init": self.init}
        if self.name == "latent":
            sizes["num_latents"] = self.num_latents
        return {"name": self.name, **{k: v for k, v in sizes.items() if v is not None}}


@dataclass
class LoraConfig:
    """LoRA on the backbone through ``peft`` (NV-Embed: rank 16, alpha 32, dropout 0.1); the head trains fully."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_LORA_TARGETS))
    merge_on_save: bool = True  # saved models: LoRA merged into the weights (false: a separate adapter/ folder)


@dataclass
class ModelConfig:
    """What model to train, and how it turns tokens into one vector."""

    name_or_path: str  # known model name, backbone preset (meta/random init) or folder (the starting weights)
    # a backbone preset only: config fields replacing the preset's (e.g. {num_layers: 4, hidden_size: 128})
    preset_overrides: dict[str, Any] | None = None
    # a backbone preset only: the tokenizer (a packaged model name or a folder) with which the preset is
    # built with random weights to train from scratch (an mlm stage); without it a preset is shapes only
    tokenizer: str | None = None
    attention: AttentionName | None = None  # decoders; None: what the model folder says
    pooling: PoolingName | PoolingConfig | None = None  # None: what the model folder says
    normalize: bool | None = None
    max_seq_len: int | None = None
    prompts: dict[str, str] | None = None
    pool_prompt: bool | None = None  # false: prompts are instructions, attended to but not pooled (NV-Embed)
    add_eos: bool | None = None  # append EOS to every input; None: the folder's choice (true for decoders)
    padding_side: PaddingSide | None = None
    instruction_template: str | None = None  # e.g. "Instruct: {instruction}\nQuery: " (NV-Embed)
    # how embeddings shorten to fewer dimensions (embforge.modeling.head.MATRYOSHKA_RULES); None: the folder's
    matryoshka_rule: MatryoshkaRule | None = None
    # start a new pooling head even where name_or_path holds a trained one (else a conflicting `pooling`
    # is an error, and a matching or absent one loads the trained head)
    new_head: bool = False
    lora: LoraConfig | None = None
    # dtype of the frozen weights (with LoRA: the base model). Every trained tensor (LoRA, the head, a
    # fully trained backbone) keeps a float32 master and float32 optimizer state; the stage's
    # `precision: bf16` is the autocast that runs the matrix products in bf16
    dtype: Literal["float32", "bfloat16"] = "float32"
    save_dtype: Literal["float32", "bfloat16"] = "float32"  # saved models' weights, after a float32 LoRA merge
    gradient_checkpointing: bool = False

    def pooling_dict(self) -> dict | None:
        if self.pooling is None:
            return None
        if isinstance(self.pooling, str):
            return PoolingConfig(name=self.pooling).as_dict()
        return self.pooling.as_dict()
