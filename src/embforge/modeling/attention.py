"""How a backbone attends on padded batches: encoders as they are, decoder LLMs bidirectional or causal.

NV-Embed (arXiv 2405.17428 §3.1) removes a decoder's causal mask: every token attends to
every non-pad token. On a padded batch that is a 4-D boolean mask (B, 1, T, T) holding the
key-padding mask only, passed as ``attention_mask``. It rests on two transformers behaviours,
each pinned by a test in tests/unit/modeling/test_transformers_behaviour.py, so that an
upgrade which changes them fails a named test instead of silently turning causal again:

1. a decoder given a 4-D mask uses it as is (``masking_utils`` builds no causal mask over it);
2. transformers' SDPA attention passes ``is_causal=False`` whenever a mask is given.

Position ids count real tokens only (the rank of a token among its row's non-pad tokens),
so left and right padding give the same states. Unpadded (packed) batches are in
:mod:`.packing`.
"""

from __future__ import annotations

import torch
from torch import nn

# model_type of decoder-only LLMs whose causal mask embforge knows how to remove
DECODER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})


def is_decoder(config) -> bool:
    """True for the decoder-only LLM families in :data:`DECODER_MODEL_TYPES`."""
    return getattr(config, "model_type", None) in DECODER_MODEL_TYPES


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) rank of each token among its row's real tokens; pads repeat a neighbour's (0 before the first)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def bidirectional_mask(attention_mask: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4-D mask that lets every token see every non-pad token of its row.

    Args:
        attention_mask: (B, T), 1 for real tokens.
        additive_dtype: None: a boolean mask (SDPA-style attention, True = may attend);
            a float dtype: an additive mask (eager attention adds it to the scores).

    Returns:
        (B, 1, T, T) mask.
    """
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys every query may attend to
    keep = keep.expand(-1, 1, attention_mask.shape[1], -1)  # (B, 1, T, T)
    if additive_dtype is None:
        return keep
    bias = torch.zeros(keep.shape, dtype=additive_dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(additive_dtype).min)  # (B, 1, T, T)


def padded_decoder_forward(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bidirectional: bool, **extra
) -> torch.Tensor:
    """A decoder on a padded batch -> last hidden states (B, T, D); pad positions hold the model's states.

    Raises:
        NotImplementedError: bidirectional attention with an attention implementation other
            than eager or an SDPA-based one (whose mask semantics are not known here).
    """
    mask = attention_mask
    if bidirectional:
        impl = getattr(backbone.config, "_attn_implementation", None) or "eager"
        if impl == "eager":
            mask = bidirectional_mask(attention_mask, backbone.get_input_embeddings().weight.dtype)
        elif impl == "sdpa" or impl.startswith("embforge_varlen"):  # packed attention runs SDPA on padded calls
            mask = bidirectional_mask(attention_mask)
        else:
            raise NotImplementedError(f"bidirectional attention supports eager and sdpa, not {impl!r}")
    positions = real_token_positions(attention_mask)  # (B, T)
    out = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
    return out.last_hidden_state
