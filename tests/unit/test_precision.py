"""What ``precision: auto`` resolves to, by the CPU's bf16 support (flags patched, no such CPU needed)."""

from __future__ import annotations

import pytest
import torch
import torch.cpu

from embforge.precision import cpu_has_native_bf16, resolve_precision


def _cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, onednn: bool = True) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(True, False, True), (False, True, True), (False, False, False)],  # Zen 4 / Sapphire Rapids / Cascade Lake
)
def test_auto_is_bf16_only_where_the_cpu_runs_bf16_natively(monkeypatch, avx512_bf16, amx, native):
    # oneDNN says "supported" on every AVX-512 CPU (it emulates bf16 there); the flags decide
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, onednn=True)
    assert cpu_has_native_bf16() is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly, it is what runs


def test_bench_train_skips_bf16_without_native_support_and_says_why(monkeypatch, load_bench):
    bench = load_bench("train")
    _cpu(monkeypatch, avx512_bf16=False, amx=False)
    reason = bench.bf16_skip_reason()
    assert reason is not None and "no native bf16" in reason and torch.backends.cpu.get_cpu_capability() in reason
    _cpu(monkeypatch, avx512_bf16=True, amx=False)
    assert bench.bf16_skip_reason() is None
