"""LoRA adapters served on one copy of a base model's weights (vLLM's ``--lora-modules NAME=PATH``).

An adapter folder is what ``Embedder.save(path, merge_lora=False)`` writes: the base weights
(``model.safetensors``), the head and ``adapter/`` (peft). :func:`attach_adapters` checks that
each folder was trained on the served base — same head settings, same tokenizer, the same
backbone tensors — then loads only its LoRA weights into the base's backbone (peft keeps one
copy of the base weights and a small delta per adapter) and keeps the adapter's own pooling
head, which is swapped in for its batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embforge.errors import ConfigError, EmbforgeError


def _same_tensor(base: torch.Tensor, saved: torch.Tensor) -> bool:
    """Equal, also where the adapter folder was saved in bf16/fp16 (loads come back as float32)."""
    if base.shape != saved.shape:
        return False
    if torch.equal(base, saved):
        return True
    return base.is_floating_point() and any(
        torch.equal(base.to(dtype).to(saved.dtype), saved) for dtype in (torch.bfloat16, torch.float16)
    )


def check_same_base(base, tuned, folder: Path) -> None:
    """Refuse an adapter folder whose model is not the served base: names the first difference."""
    from embforge.models.saving import backbone_state

    base_head, tuned_head = base.head_settings(), tuned.head_settings()
    for key in base_head:
        if key != "pooling" and base_head[key] != tuned_head.get(key):
            raise ConfigError(
                f"{folder / 'embforge.json'}: {key} is {tuned_head.get(key)!r}, the served base model has "
                f"{base_head[key]!r}; an adapter is served with its base model's settings"
            )
    if base_head["pooling"].get("pooling") != tuned_head["pooling"].get("pooling"):
        raise ConfigError(
            f"{folder / 'embforge.json'}: pooling {tuned_head['pooling']!r} differs from the served base's "
            f"{base_head['pooling']!r}"
        )
    if base.tokenizer.get_vocab() != tuned.tokenizer.get_vocab():
        raise ConfigError(f"{folder}: its tokenizer is not the served base model's (the vocabularies differ)")
    _, base_state = backbone_state(base.backbone, merge_lora=False)
    _, tuned_state = backbone_state(tuned.backbone, merge_lora=False)
    for key in sorted(set(base_state) | set(tuned_state)):
        if key not in base_state or key not in tuned_state or not _same_tensor(base_state[key], tuned_state[key]):
            raise ConfigError(
                f"{folder / 'model.safetensors'}: tensor backbone.{key} differs from the served base model's: "
                "this adapter was trained on another base model"
            )


def attach_adapters(base, adapters: dict[str, str | Path]) -> dict[str, torch.nn.Module]:
    """Load each adapter onto ``base``'s backbone in place; -> adapter name -> its pooling head.

    Raises:
        ConfigError: naming the file: not an adapter folder, a damaged one, or one trained on
            another base (head settings, tokenizer or backbone tensors differ).
    """
    from peft import PeftModel

    from embforge.models.embedder import Embedder
    from embforge.models.saving import is_peft

    if is_peft(base.backbone):
        raise ConfigError(
            "the served base model carries a LoRA adapter itself: serve its base model (or a merged copy) "
            "and give the adapters with --lora-modules"
        )
    poolers: dict[str, torch.nn.Module] = {}
    for name, path in adapters.items():
        folder = Path(path)
        config = folder / "adapter" / "adapter_config.json"
        if not config.is_file():
            raise ConfigError(
                f"{config}: missing: {folder} is not an adapter folder "
                "(Embedder.save(path, merge_lora=False) writes one from a LoRA model)"
            )
        try:
            tuned = Embedder.load(folder, device=base.device)
        except EmbforgeError as exc:
            raise ConfigError(f"adapter {name!r}: {exc}") from None
        except Exception as exc:  # a damaged file deep in safetensors / peft: name the folder
            raise ConfigError(f"adapter {name!r}: {folder} cannot be read ({type(exc).__name__}: {exc})") from None
        check_same_base(base, tuned, folder)
        try:
            if is_peft(base.backbone):
                base.backbone.load_adapter(str(folder / "adapter"), adapter_name=name)
            else:
                base.backbone = PeftModel.from_pretrained(base.backbone, str(folder / "adapter"), adapter_name=name)
        except Exception as exc:
            raise ConfigError(f"adapter {name!r}: {folder / 'adapter'} cannot be loaded ({exc})") from None
        poolers[name] = tuned.pooler.eval()
        del tuned
    base.backbone.eval()
    return poolers
