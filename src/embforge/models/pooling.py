"""Poolings: token states -> one vector per text, all with the same signature.

Every pooling is ``pool(hidden, mask) -> (B, D)`` where ``hidden`` is (B, T, D) and
``mask`` is (B, T), 1 for tokens that count (non-pad; later also non-instruction).
Padding side does not matter: positions are taken from the mask, never assumed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PoolingName = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "last")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the masked token states. hidden (B, T, D), mask (B, T) -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, D)
    # clamp: an all-masked row gives zeros instead of NaN
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first counted token (the [CLS] of right-padded BERT inputs). -> (B, D)"""
    first = mask.long().argmax(dim=1)  # (B,) index of the first 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last counted token (EOS for decoders), for left or right padding. -> (B, D)"""
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


_FUNCTIONS = {"mean": mean_pool, "cls": cls_pool, "last": last_pool}


class Pooling(nn.Module):
    """A parameter-free pooling chosen by name (``mean``, ``cls`` or ``last``)."""

    def __init__(self, mode: PoolingName = "mean"):
        super().__init__()
        if mode not in _FUNCTIONS:
            raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLINGS}")
        self.mode = mode

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _FUNCTIONS[self.mode](hidden, mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
