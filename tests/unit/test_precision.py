"""What ``precision: auto`` resolves to, by the CPU's bf16 support (flags patched, no such CPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.cpu

from embforge.precision import cpu_has_native_bf16, resolve_precision


def _cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, onednn: bool = True) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "onednn", "native"),
    [
        (True, False, True, True),  # Zen 4
        (False, True, True, True),  # Sapphire Rapids
        (False, False, True, False),  # Cascade Lake: oneDNN says "supported" on every AVX-512 CPU, and emulates
        (False, False, False, False),  # AVX2-only
        (True, True, False, False),  # bf16 hardware, oneDNN capped below it (ONEDNN_MAX_CPU_ISA=AVX2)
    ],
)
def test_auto_is_bf16_only_where_the_cpu_runs_bf16_natively(monkeypatch, avx512_bf16, amx, onednn, native):
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, onednn=onednn)
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


def test_a_capped_onednn_isa_turns_auto_to_fp32_on_real_hardware():
    # no patching: oneDNN reads the cap at start-up, so a fresh interpreter under it
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from embforge.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"
