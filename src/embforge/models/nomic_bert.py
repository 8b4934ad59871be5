"""nomic-bert on top of transformers' native ``nomic_bert`` model.

The native ``NomicBertModel`` already is the paper's encoder (arXiv 2402.01613 §4.1):
rotary positions (``rope_theta`` 1000, full head dimension, rotate-half = not
interleaved), a gated MLP ``down(act(gate(x)) * up(x))`` without biases (contrastors'
``fc11`` = up, ``fc12`` = gate), q/k/v/o projections without biases, post-LayerNorm
(eps 1e-12), token-type embeddings, no dropout. This module adds only what it lacks:

- dynamic NTK scaling whose base depends on the current input alone
  (:class:`embforge.modeling.rotary.DynamicNTKRotaryEmbedding`, in the modeling package
  saved folders carry). transformers' ``rope_type: dynamic`` uses the same formula but
  keeps state across calls (after one long input, an input of exactly the trained
  length still gets the stretched base, and a long input reuses the base of the longest
  one seen before), which breaks "≤ trained length is unchanged".
- :class:`NomicBertMLMHead`: the MLM head of nomic-bert-2048 (dense without bias, the
  gate activation, LayerNorm, decoder tied to the word embeddings, no decoder bias).
  The native ``NomicBertForMaskedLM`` head has a dense bias and a decoder bias
  (31,296 parameters more than the released model).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import NomicBertConfig, NomicBertModel  # native since the transformers floor in pyproject.toml

from embforge.modeling.rotary import apply_dynamic_ntk
from embforge.models.nomic_bert_config import NomicBertSpec


def hf_config(spec: NomicBertSpec):
    """The transformers ``NomicBertConfig`` of ``spec`` (dropout 0; rope ``dynamic`` when scaled)."""
    rope = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    if spec.rope_scaling_factor:
        rope = {"rope_type": "dynamic", "factor": float(spec.rope_scaling_factor), "rope_theta": float(spec.rope_theta)}
    return NomicBertConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        hidden_act=spec.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=spec.max_trained_len,  # the NTK formula's L_max: the trained length
        type_vocab_size=spec.type_vocab_size,
        layer_norm_eps=spec.layer_norm_eps,
        pad_token_id=spec.pad_token_id,
        initializer_range=spec.initializer_range,
        rope_parameters=rope,
    )


def build_backbone(spec: NomicBertSpec, *, device: str | torch.device = "cpu"):
    """A randomly initialised ``NomicBertModel`` for ``spec`` (no pooler).

    ``device="meta"`` builds the full-size model without allocating memory (shapes and
    parameter counts only). Seed ``torch.manual_seed`` first for a reproducible init.
    """
    with torch.device(device):
        model = NomicBertModel(hf_config(spec), add_pooling_layer=False)
        apply_dynamic_ntk(model)
    return model


class NomicBertMLMHead(nn.Module):
    """Masked-token logits: dense (no bias) → gate activation → LayerNorm → tied decoder.

    Args:
        config: the backbone's ``NomicBertConfig``.
    """

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # contrastors: SiLU for swiglu models, GELU otherwise
        self.act = nn.SiLU() if config.hidden_act == "silu" else nn.GELU()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        nn.init.normal_(self.dense.weight, std=config.initializer_range)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states, (V, D) word-embedding matrix -> (..., V) logits."""
        h = self.layer_norm(self.act(self.dense(hidden)))  # (..., D)
        return nn.functional.linear(h, word_embeddings)  # (..., V): decoder tied, no bias


class NomicBertForMLM(nn.Module):
    """A ``NomicBertModel`` backbone with the MLM head; logits only where asked.

    Args:
        backbone: a ``NomicBertModel`` (e.g. from :func:`build_backbone`).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = NomicBertMLMHead(backbone.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits.

        Args:
            attention_mask: (B, T), 1 for real tokens (None: no padding).
            positions: (B, T) bool, the masked positions. Given, only their logits are
                computed — (M, V) in row-major order — which saves the (B·T, V) product.

        Returns:
            (M, V) logits if ``positions`` is given, else (B, T, V).
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        if positions is not None:
            hidden = hidden[positions]  # (M, D)
        return self.head(hidden, self.backbone.embeddings.word_embeddings.weight)
