"""An embedding, defined once: tokenised batch -> backbone -> pooling -> (Matryoshka norm) -> L2 norm.

:func:`embed` is what ``Embedder.forward`` / ``Embedder.encode``, the training loop, the ONNX
export and a saved folder's transformers / sentence-transformers classes all compute.
:func:`prepare_backbone` readies a freshly built backbone once, at load time: the stateless
dynamic-NTK rotary for nomic-bert, packed attention where the family supports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import is_decoder, padded_decoder_forward
from .head import MATRYOSHKA_RULES, HeadSpec
from .packing import (
    ROTARY_ENCODER_TYPES,
    enable_packed_attention,
    encoder_positions,
    supports_unpadding,
    unpadded_forward,
)
from .pooling import pool
from .rotary import apply_dynamic_ntk


def prepare_backbone(backbone: nn.Module) -> nn.Module:
    """Ready a transformers backbone for embedding (idempotent; call it when the model is built or loaded)."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # peft-wrapped
    apply_dynamic_ntk(base)
    enable_packed_attention(base)
    return backbone


def backbone_forward(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    bidirectional: bool,
    unpad: bool | None = None,
    **extra,
) -> torch.Tensor:
    """Run a transformers backbone and return its last hidden states (B, T, D).

    This is the one place that decides how a backbone attends. Encoders of
    ``packing.UNPAD_MODEL_TYPES`` and decoders, with packed attention enabled, run unpadded
    (:func:`.packing.unpadded_forward`: no compute on pad tokens) when ``unpad`` is true, or
    by default (None) whenever the batch has padding or the backbone is in training mode;
    other encoders get the usual 2-D padding mask, decoders :func:`.attention.padded_decoder_forward`.
    Pad positions of the result hold zeros (unpadded) or the model's states (padded);
    poolings never read them.
    """
    if unpad is None:
        # in training too without pads: the packed path's attention has the cheaper CPU dropout
        unpad = supports_unpadding(backbone) and (backbone.training or not bool(attention_mask.bool().all()))
    decoder = is_decoder(backbone.config)
    if unpad:
        return unpadded_forward(backbone, input_ids, attention_mask, causal=decoder and not bidirectional, **extra)
    if decoder:
        return padded_decoder_forward(backbone, input_ids, attention_mask, bidirectional=bidirectional, **extra)
    if backbone.config.model_type in ROTARY_ENCODER_TYPES and "position_ids" not in extra:
        extra = {**extra, "position_ids": encoder_positions(backbone, attention_mask)}
    return backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def matryoshka_norm(pooled: torch.Tensor, rule: str) -> torch.Tensor:
    """What comes between pooling and truncation to fewer dimensions. (B, D) -> (B, D)

    ``truncate``: nothing (truncate, then L2-normalise). ``layer_norm``: Nomic Embed v1.5's
    inference rule (arXiv 2402.01613, v1.5 model card): a non-affine layer norm over all D
    components (eps 1e-5), then truncate, then L2-normalise; full-size embeddings get the
    layer norm too. A sentence-transformers folder expresses it as a ``LayerNorm`` module
    with unit weight and zero bias before ``Normalize``, so its ``truncate_dim`` agrees.
    """
    if rule == "truncate":
        return pooled
    if rule == "layer_norm":
        return F.layer_norm(pooled, (int(pooled.shape[-1]),))  # int: a constant when traced (ONNX export)
    raise ValueError(f"unknown matryoshka_rule {rule!r}; choose one of {MATRYOSHKA_RULES}")


def embed(
    backbone: nn.Module,
    pooler: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling_mask: torch.Tensor | None = None,
    *,
    head: HeadSpec,
    normalize: bool | None = None,
    unpad: bool | None = None,
    **extra,
) -> torch.Tensor:
    """Tokenised batch -> embeddings (B, D): backbone, pooling over ``pooling_mask``, L2 norm.

    Args:
        input_ids / attention_mask / pooling_mask: (B, T), from :class:`.tokenization.TextEncoder`;
            ``pooling_mask`` None pools every real token.
        head: the model's :class:`.head.HeadSpec`: its attention (decoders: the causal mask removed
            or kept), Matryoshka rule (:func:`matryoshka_norm` before L2 normalisation) and normalisation.
        normalize: None: the head's; False: leave the vectors unnormalised (to shorten them first).
        unpad: run the backbone on real tokens only (None: wherever supported, see :func:`backbone_forward`).

    Returns:
        (B, D) embeddings in the pooler's dtype, L2-normalised if the head (or ``normalize``) says so.
    """
    hidden = backbone_forward(
        backbone, input_ids, attention_mask, bidirectional=head.bidirectional, unpad=unpad, **extra
    )
    return states_to_embeddings(pooler, hidden, attention_mask, pooling_mask, head=head, normalize=normalize)


def states_to_embeddings(
    pooler: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling_mask: torch.Tensor | None = None,
    *,
    head: HeadSpec,
    normalize: bool | None = None,
) -> torch.Tensor:
    """Last hidden states (B, T, D) -> embeddings (B, D): pooling, the head's Matryoshka rule, L2 norm.

    Row-wise: rows may be pooled in groups (a server's rows of several LoRA adapters, each with
    its own head) and give what one call over all of them gives.
    """
    pooled = pool(pooler, hidden, attention_mask if pooling_mask is None else pooling_mask, attention_mask)
    pooled = matryoshka_norm(pooled, head.matryoshka_rule)
    return F.normalize(pooled, dim=-1) if (head.normalize if normalize is None else normalize) else pooled
