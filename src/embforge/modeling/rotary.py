"""Dynamic NTK rotary scaling computed from each sequence's own length (nomic-bert beyond its trained length).

Nomic Embed (arXiv 2402.01613 §4.1) trains nomic-bert at 2,048 tokens and extends it to
8,192 at inference with dynamic NTK scaling. transformers' ``rope_type: dynamic`` uses the
same formula but keeps state across calls (after one long input, an input of exactly the
trained length still gets the stretched base, and a long input reuses the base of the
longest one seen before): a text's vector would depend on what was encoded before it.
:class:`DynamicNTKRotaryEmbedding` is stateless; saved folders carry this file, so
sentence-transformers and ``AutoModel`` use it too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.nomic_bert.modeling_nomic_bert import NomicBertRotaryEmbedding


class DynamicNTKRotaryEmbedding(NomicBertRotaryEmbedding):
    """Rotary cos/sin with dynamic NTK scaling computed from each sequence's own length.

    For a sequence of length L (its largest position id + 1) and trained length L_max:
    ``base' = base · (s·L/L_max − (s − 1)) ** (d / (d − 2))`` if L > L_max, else ``base``
    — the formula of contrastors and of transformers' ``dynamic`` rope type, evaluated
    in the same float32 arithmetic, but without state carried between calls. Sequences of
    L ≤ L_max use the unscaled frequencies bit for bit.

    A row of ``position_ids`` may hold several sequences: a new one starts wherever the
    position does not increase (packed batches, whose positions restart at 0, and padded
    rows whose pad positions are clamped to the last real one), so every text gets its
    own L whatever it is batched with.
    """

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.config.rope_parameters
        s, max_len = params["factor"], self.original_max_seq_len
        d = 2 * self.original_inv_freq.shape[-1]  # rotary dimension (the full head)
        B, T = position_ids.shape
        rising = position_ids[:, 1:] > position_ids[:, :-1]  # (B, T-1): the next token continues the sequence
        true = torch.ones_like(position_ids[:, :1], dtype=torch.bool)  # (B, 1)
        starts = torch.cat([true, ~rising], dim=1)  # (B, T) first token of a sequence
        ends = torch.cat([~rising, true], dim=1)  # (B, T) last token of a sequence
        segment = starts.long().cumsum(-1)  # (B, T) sequence number within the row, from 1
        # a sequence's length is its last token's position + 1; a plain scatter of the end tokens
        # (one per sequence; the others all go to the unused column 0) exports to ONNX
        index = torch.where(ends, segment, torch.zeros_like(segment))  # (B, T)
        last = position_ids.new_zeros(B, T + 1).scatter(1, index, position_ids)  # (B, T+1)
        length = last.gather(1, segment)[..., None] + 1  # (B, T, 1) int64: the token's sequence length
        stretch = ((s * length / max_len) - (s - 1)).clamp(min=1.0) ** (d / (d - 2))  # (B, T, 1) float32
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d  # (d/2,)
        scaled = 1.0 / ((params["rope_theta"] * stretch) ** exponent)  # (B, T, d/2)
        original = self.original_inv_freq.to(device=x.device, dtype=torch.float)  # (d/2,)
        inv_freq = torch.where(length > max_len, scaled, original)  # (B, T, d/2)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): rotate-half layout
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def apply_dynamic_ntk(model: nn.Module) -> nn.Module:
    """Swap the native rotary module of a ``NomicBertModel`` for :class:`DynamicNTKRotaryEmbedding`.

    Only when its config asks for ``rope_type: dynamic``; otherwise (and if already
    swapped) the model is returned unchanged. Call it after ``from_pretrained`` /
    ``AutoModel`` on any nomic_bert folder.
    """
    rotary = getattr(model, "rotary_emb", None)
    config = model.config
    if rotary is None or config.model_type != "nomic_bert" or config.rope_parameters.get("rope_type") != "dynamic":
        return model
    if not isinstance(rotary, DynamicNTKRotaryEmbedding):
        with torch.device(rotary.original_inv_freq.device):
            model.rotary_emb = DynamicNTKRotaryEmbedding(model.config)
    return model
