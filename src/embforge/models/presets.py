"""Backbone presets: the real architectures by name, every family in one table (no weights, no torch).

litgpt-style: ``preset_config("mistral-7b", num_hidden_layers=2)`` shrinks the real shape for
tests and memory plans. A recipe whose ``name_or_path`` is a preset builds the backbone from
this table (random init, or on the ``meta`` device for ``embforge plan``). Each preset names its
family: ``transformers`` (a config dict for ``AutoConfig.for_model``) or ``nomic_bert`` (fields of
:class:`~embforge.models.nomic_bert_config.NomicBertSpec`, which :func:`~embforge.models.nomic_bert_config.from_name` reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embforge.config import did_you_mean
from embforge.errors import ConfigError


@dataclass(frozen=True)
class BackbonePreset:
    family: Literal["transformers", "nomic_bert"]
    fields: dict = field(default_factory=dict)


def _transformers(**config) -> BackbonePreset:
    return BackbonePreset("transformers", config)


BACKBONE_PRESETS: dict[str, BackbonePreset] = {
    # Mistral-7B-v0.1 (NV-Embed's backbone, arXiv 2405.17428 §4.1): 7,110,660,096 parameters without lm_head
    "mistral-7b": _transformers(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
    ),
    # SmolLM2-135M (the packaged small decoder, ../shared/MODELS.md)
    "smollm2-135m": _transformers(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # nomic-bert-2048 (Nomic Embed's encoder, arXiv 2402.01613 §4.1 / Table 6; 136,731,648 parameters
    # without the MLM head): NomicBertSpec's defaults are exactly this model
    "nomic-bert-2048": BackbonePreset("nomic_bert"),
}


def backbone_preset(name: str, family: str | None = None) -> BackbonePreset:
    """The preset ``name`` (of ``family`` where given); a ConfigError with a did-you-mean otherwise."""
    known = {n: p for n, p in BACKBONE_PRESETS.items() if family is None or p.family == family}
    if name not in known:
        kind = "backbone" if family is None else family.replace("_", "-")
        raise ConfigError(f"unknown {kind} preset {name!r}" + did_you_mean(name, known) + f"; known: {sorted(known)}")
    return known[name]


def preset_config(name: str, **overrides) -> dict:
    """A copy of transformers preset ``name``'s config dict with ``overrides`` applied."""
    return {**backbone_preset(name, "transformers").fields, **overrides}
