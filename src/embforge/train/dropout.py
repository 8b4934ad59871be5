"""Training-only: CPU dropout at a third of the cost of ``F.dropout``, in layers and in packed attention.

Not part of the modeling package copied into saved folders (nothing at inference uses it).
:func:`use_fast_dropout`, called when a stage starts, swaps a model's ``nn.Dropout`` modules
and switches its packed attention to :data:`TRAIN_VARLEN_ATTENTION`, the same kernel with
this dropout on the attention probabilities.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from embforge.modeling.packing import VARLEN_ATTENTION, register_packed_attention, sdpa_block, varlen_attention

# CPU dropout at a third of the cost of F.dropout, same distribution. PyTorch's CPU dropout draws
# float Bernoulli noise (``bernoulli_``: about 6 ns per element on a 2-core AVX512 machine),
# divides it by the keep probability and multiplies; training the packaged MiniLM that was
# 15 % of a step, mostly on the attention probabilities (B x heads x T x T). Here the mask
# comes from uniform 32-bit draws (one ``random_`` call fills int64 words, two draws each:
# about 2 ns per element): an element is dropped when its draw is among the lowest
# round(p * 2^32) of the 2^32 values, so the drop probability is p within 2^-33 (torch.rand's
# float32 uniforms resolve 2^-24). Survivors are scaled by 1 / (1 - p) as in PyTorch, and the
# mask is kept as bool for the backward pass (a quarter of the float noise's memory). Draws
# come from PyTorch's default CPU generator: torch.manual_seed and saved RNG states repeat runs
# exactly. On other devices (CUDA has fused dropout kernels) this is F.dropout.
_INT32_MIN = -(2**31)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each element True with probability ``1 - p`` (within 2^-33)."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # every 64-bit value equally likely
    draws = words.view(torch.int32)[:n]  # two uniform 32-bit draws per word
    return (draws >= _INT32_MIN + round(p * 2**32)).view(shape)


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale, with the bool mask saved for the backward pass."""

    @staticmethod
    def noise(mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        # through uint8: bool -> float converts about 2.5x slower, and float * bool 8x slower than float * float
        return mask.view(torch.uint8).to(dtype).mul_(scale)

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * _MaskedScale.noise(mask, scale, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * _MaskedScale.noise(mask, ctx.scale, grad.dtype), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with a cheaper mask on CPU (see this section's comment)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` running :func:`dropout` (an instance of ``nn.Dropout``, same ``p``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nobody in transformers' encoders asks for it; keep PyTorch's semantics
            return super().forward(x)
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` under ``module`` for :class:`Dropout`, and packed attention for
    :data:`TRAIN_VARLEN_ATTENTION`; return how many dropout modules were swapped.

    In eval mode (dropout off) both compute exactly what they replace.
    """
    swapped = 0
    for parent in module.modules():
        config = getattr(parent, "config", None)
        if getattr(config, "_attn_implementation", None) == VARLEN_ATTENTION:
            config._attn_implementation = TRAIN_VARLEN_ATTENTION
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped


def dropout_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with dropout on the probabilities, for CPU training.

    PyTorch's fused CPU attention has no dropout, so with dropout SDPA falls back to its
    math path; this is that path with :func:`dropout`'s cheaper mask and a plain additive
    key mask. query/key/value (B, H, T, Dh); ``key_mask`` bool, broadcastable to
    (B, H, T, T), True where attention may look (or None). Returns (B, H, T, Dh).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (B, H, T, T)
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~key_mask, torch.finfo(scores.dtype).min)
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p, True)
    return torch.matmul(probs, value)  # (B, H, T, Dh)


def _train_block(q, k, v, key_mask, dropout_p: float, scale: float | None) -> torch.Tensor:
    """One packed-attention block; with dropout on CPU (SDPA's CPU kernel has none), :func:`dropout_attention`."""
    if dropout_p > 0.0 and q.device.type == "cpu":
        return dropout_attention(q, k, v, key_mask, dropout_p, scale)
    return sdpa_block(q, k, v, key_mask, dropout_p, scale)


TRAIN_VARLEN_ATTENTION = VARLEN_ATTENTION + "_train"
register_packed_attention(TRAIN_VARLEN_ATTENTION, functools.partial(varlen_attention, attend=_train_block))
