"""nomic-bert architecture presets: plain dataclasses, no torch (litgpt-style ``from_name``).

``from_name("nomic-bert-2048")`` is the model of the Nomic Embed paper (arXiv 2402.01613,
§4.1): BERT-base sized, rotary positions (base 1000, full fraction, not interleaved),
SwiGLU without biases, post-LayerNorm (eps 1e-12), no dropout, vocabulary 30,522 padded
to 30,528. Tests shrink the *real* preset with overrides::

    spec = from_name("nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)

:mod:`embforge.models.nomic_bert` turns a spec into a transformers ``NomicBertModel``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from embforge.config import did_you_mean
from embforge.errors import ConfigError
from embforge.models.presets import backbone_preset

BERT_UNCASED_VOCAB = 30522  # bert-base-uncased WordPiece (= the packaged MiniLM's vocabulary)
VOCAB_MULTIPLE = 64  # paper §4.1: the vocabulary is padded to a multiple of 64 (tensor-core friendly)


def pad_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round ``size`` up to a multiple of ``multiple`` (30,522 -> 30,528)."""
    if size < 1 or multiple < 1:
        raise ConfigError(f"vocabulary size and multiple must be >= 1, got {size} and {multiple}")
    return -(-size // multiple) * multiple


@dataclass(frozen=True)
class NomicBertSpec:
    """Architecture of a nomic-bert encoder (HF field spellings).

    ``max_trained_len`` is the context the model was trained at; beyond it, dynamic NTK
    rotary scaling with ``rope_scaling_factor`` (``None``: off) stretches the positions
    up to ``max_seq_len``. At or below ``max_trained_len`` the scaling changes nothing.
    """

    name: str
    vocab_size: int = pad_vocab_size(BERT_UNCASED_VOCAB)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    hidden_act: Literal["silu", "gelu", "sigmoid"] = "silu"  # gate activation: SwiGLU / GeGLU / GLU
    rope_theta: float = 1000.0
    max_trained_len: int = 2048
    rope_scaling_factor: float | None = 2.0  # dynamic NTK factor s (paper §5: 2048 -> 8192 at inference)
    max_seq_len: int = 8192
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the numbers cannot form a model."""
        where = f"nomic-bert spec {self.name!r}"
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_trained_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ConfigError(
                f"{where}: hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size"
            )
        if self.head_dim <= 2 and self.rope_scaling_factor:
            raise ConfigError(f"{where}: dynamic NTK needs a head size > 2 (exponent d/(d-2))")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor < 1:
            raise ConfigError(f"{where}: rope_scaling_factor must be >= 1 or null, got {self.rope_scaling_factor}")
        if self.max_seq_len < self.max_trained_len:
            raise ConfigError(f"{where}: max_seq_len {self.max_seq_len} < max_trained_len {self.max_trained_len}")
        if self.max_seq_len > self.max_trained_len and not self.rope_scaling_factor:
            raise ConfigError(
                f"{where}: max_seq_len {self.max_seq_len} exceeds max_trained_len {self.max_trained_len} "
                "without rope_scaling_factor"
            )


def from_name(name: str, **overrides) -> NomicBertSpec:
    """The preset ``name`` with fields replaced by ``overrides`` (validated).

    Raises:
        ConfigError: unknown preset or field (with a did-you-mean), or an impossible shape.
    """
    preset = backbone_preset(name, "nomic_bert")  # the one preset table, every family
    fields = {f.name for f in dataclasses.fields(NomicBertSpec)} - {"name"}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"unknown nomic-bert field {key!r}" + did_you_mean(key, fields))
    spec = NomicBertSpec(name=name, **{**preset.fields, **overrides})
    spec.validate()
    return spec
