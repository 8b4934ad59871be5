"""A LoRA adapter kept apart in a saved folder (``adapter/``), merged into the backbone when the folder loads.

embforge keeps the adapter apart (``merge_on_save: false``) so that a later recipe trains it on
from exactly where it stopped; transformers and sentence-transformers, which know nothing of
it, would embed with the bare base model. ``EmbforgeModel.from_pretrained`` therefore merges it
here, in float32 (W + B @ A · alpha / r, the peft LoRA rule), without peft. Adapter features
beyond plain LoRA on linear layers (DoRA, trained biases, per-module ranks, modules_to_save)
are refused with an error naming them: embforge never writes them.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

ADAPTER_DIR = "adapter"
_PLAIN = {"use_dora": False, "bias": "none", "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
_PREFIX = "base_model.model."


def lora_pairs(
    config: dict, state: dict[str, torch.Tensor]
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's scaling and its ``{module name: (A, B)}`` (A: (r, in), B: (out, r)).

    Args:
        config: the adapter's ``adapter_config.json``.
        state: its tensors, named as peft saves them (``base_model.model.<module>.lora_A.weight``).

    Raises:
        ValueError: an adapter that W + B @ A · scaling does not reproduce, or a B without its A.
    """
    unsupported = {
        k: config.get(k) for k, plain in _PLAIN.items() if config.get(k, plain) not in (plain, None, {}, False)
    }
    if config.get("peft_type", "LORA") != "LORA" or config.get("fan_in_fan_out") or unsupported:
        raise ValueError(f"only plain LoRA adapters merge here; this one has {unsupported or config.get('peft_type')}")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            b = state.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise ValueError(f"adapter tensor {key!r} has no lora_B beside it")
            pairs[key.removesuffix(".lora_A.weight").removeprefix(_PREFIX)] = (a, b)
    return scaling, pairs


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """B @ A · scaling in float32: (out, r) @ (r, in) -> (out, in)."""
    return (b.float() @ a.float()) * scaling


def merge_adapter(backbone: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> int:
    """Add every ``B @ A · scaling`` of the adapter ``state`` to its weight in ``backbone``; return how many.

    Raises:
        ValueError: see :func:`lora_pairs`; also a tensor naming no module of the backbone.
    """
    scaling, pairs = lora_pairs(config, state)
    for name, (a, b) in pairs.items():
        try:
            weight = backbone.get_submodule(name).weight
        except AttributeError as exc:
            raise ValueError(f"adapter module {name!r} is no module of the backbone") from exc
        with torch.no_grad():  # the sum in float32, one cast to the weight's dtype
            weight.copy_((weight.float() + lora_delta(a, b, scaling)).to(weight.dtype))
    return len(pairs)


def load_and_merge(backbone: nn.Module, folder: str, **hub_kwargs) -> bool:
    """Merge ``folder/adapter`` into ``backbone`` if the folder has one; True when it did.

    ``folder`` is a local folder or a hub repository (``hub_kwargs``: what ``from_pretrained`` got).
    """
    from transformers.modeling_utils import load_state_dict
    from transformers.utils import cached_file

    def find(name: str):
        return cached_file(folder, f"{ADAPTER_DIR}/{name}", _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    config_file = find("adapter_config.json")
    if config_file is None:
        return False
    weights = find("adapter_model.safetensors")
    if weights is None:
        raise ValueError(f"{folder}: {ADAPTER_DIR}/adapter_config.json has no adapter_model.safetensors beside it")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if not merge_adapter(backbone, config, load_state_dict(weights)):
        raise ValueError(f"{folder}: {ADAPTER_DIR}/adapter_model.safetensors holds no LoRA tensors")
    return True
