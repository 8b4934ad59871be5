"""Backbone presets: the real architectures' configs by name (no weights, no torch).

litgpt-style: ``preset_config("mistral-7b", num_hidden_layers=2)`` shrinks the real shape for
tests and memory plans. A recipe whose ``name_or_path`` is a preset builds the backbone from
this config (random init, or on the ``meta`` device for ``embforge plan``).
"""

from __future__ import annotations

from embforge.config import did_you_mean
from embforge.errors import ConfigError

BACKBONE_PRESETS: dict[str, dict] = {
    # Mistral-7B-v0.1 (NV-Embed's backbone, arXiv 2405.17428 §4.1): 7,110,660,096 parameters without lm_head
    "mistral-7b": dict(
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
    "smollm2-135m": dict(
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
}


def preset_config(name: str, **overrides) -> dict:
    """A copy of preset ``name``'s config dict with ``overrides`` applied."""
    if name not in BACKBONE_PRESETS:
        raise ConfigError(f"unknown backbone preset {name!r}" + did_you_mean(name, BACKBONE_PRESETS))
    return {**BACKBONE_PRESETS[name], **overrides}
