"""Poolings: token states (B, T, D) + a pooling mask (B, T) -> one vector per text (B, D).

Parameter-free: ``mean``, ``cls`` (first pooled token) and ``last`` (last pooled token: EOS
for decoders, for left or right padding). Trainable: NV-Embed's latent attention
(:class:`AttentionPooling`, arXiv 2405.17428 §3.2) and, without latents, a self-attention
ablation. Every pooling has one signature (:func:`pool`), and its settings dict
(``config()``) is what a saved folder stores and :func:`build_pooler` reads back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .head import HEAD_INITS, POOLINGS


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the masked token states. hidden (B, T, D), mask (B, T) -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, D)
    # clamp: an all-masked row gives zeros instead of NaN
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first counted token (the [CLS] of BERT inputs). -> (B, D)"""
    first = mask.long().argmax(dim=1)  # (B,) index of the first 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last counted token (EOS for decoders), for left or right padding. -> (B, D)"""
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


_PARAMETER_FREE = {"mean": mean_pool, "cls": cls_pool, "last": last_pool}


class Pooling(nn.Module):
    """A parameter-free pooling chosen by name (``mean``, ``cls`` or ``last``)."""

    def __init__(self, name: str = "mean"):
        super().__init__()
        if name not in _PARAMETER_FREE:
            raise ValueError(f"unknown parameter-free pooling {name!r}; choose one of {sorted(_PARAMETER_FREE)}")
        self.name = name

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _PARAMETER_FREE[self.name](hidden, mask)

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class GEGLU(nn.Module):
    """x, gate = split(x); x * gelu(gate). (B, T, 2F) -> (B, T, F)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class AttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling (or, without latents, a self-attention ablation).

    The token states are the queries. With ``num_latents`` a trainable latent array
    (K, D) is both keys and values (NV-Embed); with ``num_latents=None`` the token states
    themselves are keys and values (pad keys masked). Then, as in the released model:
    pre-LayerNorm + multi-head attention + residual, pre-LayerNorm + GEGLU feed-forward
    (``mlp_ratio`` x width, with biases) + residual, mean over the pooling mask.

    NV-Embed preset at D = 4096: 512 latents, 8 heads x head_dim 4096 -> 740,356,096 parameters.

    ``init="mean"`` zeroes the two output projections (attention's ``to_out`` and the
    feed-forward's last layer, bias included): both residual branches then add nothing, so a
    new head starts as exactly mean pooling and learns away from it. ``init`` only shapes a
    new head; it is not part of :meth:`config` (a saved head loads its trained weights).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_latents: int | None = 512,
        num_heads: int = 8,
        head_dim: int | None = None,
        mlp_ratio: int = 4,
        init: str = "random",
    ):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {HEAD_INITS}, got {init!r}")
        self.hidden_size, self.num_latents, self.num_heads = hidden_size, num_latents, num_heads
        self.head_dim = head_dim or hidden_size
        self.mlp_ratio = mlp_ratio
        inner = num_heads * self.head_dim
        self.norm = nn.LayerNorm(hidden_size)  # on the token states (queries)
        self.norm_context = nn.LayerNorm(hidden_size)  # on the latents (keys/values)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.norm_ff = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(
            nn.Linear(hidden_size, 2 * mlp_ratio * hidden_size),
            GEGLU(),
            nn.Linear(mlp_ratio * hidden_size, hidden_size),
        )
        if num_latents:
            self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        if init == "mean":
            for weight in (self.to_out.weight, self.ff[2].weight, self.ff[2].bias):
                nn.init.zeros_(weight)

    @property
    def name(self) -> str:
        return "latent" if self.num_latents else "self_attention"

    def config(self) -> dict:
        return {
            "name": self.name,
            "num_latents": self.num_latents,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "mlp_ratio": self.mlp_ratio,
        }

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """hidden (B, T, D), mask (B, T) pooling mask, attention_mask (B, T) non-pad -> (B, D)."""
        if self.num_latents and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return self._latent_forward(hidden, mask)  # the same result, pooled tokens only (exports trace this path)
        B, T, _ = hidden.shape
        H, Dh = self.num_heads, self.head_dim
        x = self.norm(hidden)
        key_mask = None
        if self.num_latents:
            context = self.norm_context(self.latents).unsqueeze(0).expand(B, -1, -1)  # (B, K, D)
        else:  # self-attention: the tokens are keys and values too, pad keys masked
            context = self.norm_context(hidden)  # (B, T, D)
            if attention_mask is not None:
                key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        q = self.to_q(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, K, H·Dh) each
        k = k.reshape(B, -1, H, Dh).transpose(1, 2)  # (B, H, K, Dh)
        v = v.reshape(B, -1, H, Dh).transpose(1, 2)  # (B, H, K, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, Dh)
        hidden = self.to_out(attn.transpose(1, 2).reshape(B, T, H * Dh)) + hidden  # (B, T, D)
        hidden = self.ff(self.norm_ff(hidden)) + hidden  # (B, T, D)
        return mean_pool(hidden, mask)

    def _latent_forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latent attention on the pooled tokens only.

        Every token attends to the latents, never to another token, so a token's output
        depends on its own state alone: the pad and instruction positions, which the mean
        leaves out, are not computed at all (same result as computing them; with right-padded
        batches most positions are pads). The pooled tokens are packed (N, D), run through
        attention and feed-forward, and averaged back per row.
        """
        B, _, D = hidden.shape
        H, Dh = self.num_heads, self.head_dim
        keep = mask.bool()
        rows = keep.nonzero()[:, 0]  # (N,) row of each pooled token
        tokens = hidden[keep]  # (N, D)
        context = self.norm_context(self.latents)  # (K, D)
        q = self.to_q(self.norm(tokens)).view(-1, H, Dh).transpose(0, 1)  # (H, N, Dh)
        k, v = (t.view(-1, H, Dh).transpose(0, 1) for t in self.to_kv(context).chunk(2, dim=-1))  # (H, K, Dh)
        attn = F.scaled_dot_product_attention(q, k, v)  # (H, N, Dh)
        tokens = self.to_out(attn.transpose(0, 1).reshape(-1, H * Dh)) + tokens  # (N, D)
        tokens = self.ff(self.norm_ff(tokens)) + tokens  # (N, D)
        summed = tokens.new_zeros(B, D).index_add_(0, rows, tokens)
        counts = keep.sum(dim=1, keepdim=True).to(tokens.dtype).clamp(min=1e-9)  # an empty row gives zeros
        return summed / counts


def build_pooler(cfg: dict, hidden_size: int) -> nn.Module:
    """A pooler from its settings, e.g. ``{"name": "latent", "num_latents": 512, "head_dim": 64}``.

    Settings that are None take the pooler's defaults (``head_dim`` None: the hidden size).
    """
    cfg = {k: v for k, v in cfg.items() if v is not None}
    name = cfg.pop("name", "mean")
    if name in _PARAMETER_FREE:
        if cfg:
            raise ValueError(f"pooling {name!r} takes no settings, got {sorted(cfg)}")
        return Pooling(name)
    if name == "latent":
        return AttentionPooling(hidden_size, **cfg)
    if name == "self_attention":
        cfg.pop("num_latents", None)
        return AttentionPooling(hidden_size, num_latents=None, **cfg)
    raise ValueError(f"unknown pooling {name!r}; choose one of {POOLINGS}")


def pooling_config(cfg: dict, hidden_size: int) -> dict:
    """The full settings a pooler built from ``cfg`` reports (its ``config()``), without building it."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        return build_pooler(cfg, hidden_size).config()


def pool(pooler: nn.Module, hidden: torch.Tensor, pooling_mask: torch.Tensor, attention_mask: torch.Tensor):
    """Apply any pooler with the one signature all poolings share. -> (B, D)

    A trainable head whose weights are fp32 while the backbone's frozen weights are bf16
    gets the token states in its own dtype (under autocast, its matrix products still run
    in bf16).
    """
    if isinstance(pooler, AttentionPooling):
        dtype = pooler.norm.weight.dtype
        return pooler(hidden.to(dtype), pooling_mask, attention_mask)
    return pooler(hidden, pooling_mask)


def num_parameters(module: nn.Module) -> int:
    """Parameter count (works on the meta device; shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += math.prod(p.shape)
    return total
