"""The recipe's ``model:`` block: backbone, attention, pooling head, prompts, LoRA, dtype.

Plain dataclasses (no torch), read strictly by :func:`embforge.config.from_dict`. The
one function that turns a spec into a model is :func:`embforge.models.build.build_embedder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PoolingName = Literal["mean", "cls", "last", "latent", "self_attention"]

# LoRA targets of the Llama/Mistral/Qwen families: every attention and MLP projection
DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PoolingConfig:
    """A pooling and its own sizes (only the attention poolings have sizes)."""

    name: PoolingName = "mean"
    num_latents: int = 512  # NV-Embed: 512 latents (arXiv 2405.17428 §3.2)
    num_heads: int = 8  # NV-Embed: 8 heads
    head_dim: int | None = None  # None: the hidden size (NV-Embed's released 8 x 4096); 64-128 for small backbones
    mlp_ratio: int = 4  # GEGLU feed-forward width, x hidden size

    def as_dict(self) -> dict:
        """The pooler's constructor settings (see ``portable.build_pooler``)."""
        if self.name in ("mean", "cls", "last"):
            return {"name": self.name}
        sizes = {"num_heads": self.num_heads, "head_dim": self.head_dim, "mlp_ratio": self.mlp_ratio}
        if self.name == "latent":
            sizes["num_latents"] = self.num_latents
        return {"name": self.name, **sizes}


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
    attention: Literal["bidirectional", "causal"] | None = None  # decoders; None: what the model folder says
    pooling: PoolingName | PoolingConfig | None = None  # None: what the model folder says
    normalize: bool | None = None
    max_seq_len: int | None = None
    prompts: dict[str, str] | None = None
    pool_prompt: bool | None = None  # false: prompts are instructions, attended to but not pooled (NV-Embed)
    add_eos: bool | None = None  # append EOS to every input; None: the folder's choice (true for decoders)
    padding_side: Literal["left", "right"] | None = None
    instruction_template: str | None = None  # e.g. "Instruct: {instruction}\nQuery: " (NV-Embed)
    # how embeddings shorten to fewer dimensions: "truncate" then L2, or "layer_norm" (Nomic Embed v1.5:
    # non-affine layer norm, truncate, L2); None: what the model folder says
    matryoshka_rule: Literal["truncate", "layer_norm"] | None = None
    lora: LoraConfig | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights' dtype (bf16 autocast is the stage's precision)
    gradient_checkpointing: bool = False

    def pooling_dict(self) -> dict | None:
        if self.pooling is None:
            return None
        if isinstance(self.pooling, str):
            return PoolingConfig(name=self.pooling).as_dict()
        return self.pooling.as_dict()
