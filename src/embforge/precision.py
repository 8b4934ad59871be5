"""Numeric precision: one rule for what ``auto`` means, for training and for inference.

``bf16`` is autocast everywhere in embforge: matrix products and attention run in bfloat16,
weights, reductions, the loss and the returned embeddings stay float32.
"""

from __future__ import annotations

import contextlib
import typing

import torch

from embforge.config import PrecisionName
from embforge.errors import ConfigError

PRECISIONS: tuple[str, ...] = typing.get_args(PrecisionName)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 natively (AVX512-BF16 or AMX tiles) and oneDNN may use it.

    Both must hold. oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is
    true on any AVX-512 CPU, including those (Skylake/Cascade Lake) that only emulate bf16,
    so the instruction-set flags say what runs natively; but the flags read the hardware,
    and oneDNN's check is what turns false when its ISA is capped below AVX-512
    (``ONEDNN_MAX_CPU_ISA=AVX2``), where a bf16 matmul is emulated (measured 23x slower
    than on the uncapped AVX512-BF16 CPU). Older torch without the flags: oneDNN's check.
    """
    import torch.cpu

    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(f is None for f in flags):
        return onednn
    return onednn and any(f() for f in flags)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX), else ``fp32``.

    On CPUs without native bf16 (AVX2-only) autocast would be emulated and several times
    slower, so ``auto`` keeps fp32 there.

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str):
    """A context that runs ``precision`` (already resolved, or ``auto``) on ``device``'s type."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
