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


def merge_adapter(backbone: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> int:
    """Add every ``B @ A · scaling`` of the adapter ``state`` to its weight in ``backbone``; return how many.

    Args:
        config: the adapter's ``adapter_config.json``.
        state: its tensors, named as peft saves them (``base_model.model.<module>.lora_A.weight``).

    Raises:
        ValueError: an adapter this merge does not reproduce, or a tensor naming no module.
    """
    unsupported = {
        k: config.get(k) for k, plain in _PLAIN.items() if config.get(k, plain) not in (plain, None, {}, False)
    }
    if config.get("peft_type", "LORA") != "LORA" or config.get("fan_in_fan_out") or unsupported:
        raise ValueError(f"only plain LoRA adapters merge here; this one has {unsupported or config.get('peft_type')}")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    merged = 0
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(_PREFIX)
        b = state[key.replace(".lora_A.", ".lora_B.")]
        try:
            weight = backbone.get_submodule(name).weight
        except AttributeError as exc:
            raise ValueError(f"adapter tensor {key!r} names no module of the backbone") from exc
        with torch.no_grad():  # (out, in) += (out, r) @ (r, in) · scaling, in float32
            weight.copy_((weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype))
        merged += 1
    return merged


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
