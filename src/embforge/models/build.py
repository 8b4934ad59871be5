"""The one function that turns a recipe's ``model:`` block into an :class:`Embedder`.

``build_embedder(spec)`` loads the starting weights (packaged name or folder) or builds a
backbone preset from its config, applies the spec's attention, pooling head and prompts,
then LoRA, then the dtype -- to the frozen weights only: every tensor that trains stays
float32 (its master copy; the optimizer state follows it), so a bf16 recipe's LoRA and
latent head learn at a 2e-5 learning rate, where bf16 weights would round most updates
away. With ``device="meta"`` nothing is allocated: parameter counts and memory plans of
7B-parameter models come out in milliseconds.
"""

from __future__ import annotations

import torch

from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.presets import BACKBONE_PRESETS, preset_config
from embforge.models.saving import backbone_from_config, is_peft
from embforge.models.spec import LoraConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def head_overrides(spec: ModelConfig) -> dict:
    """The head settings the spec sets (its fields named as :class:`HeadSpec` fields; None: keep the folder's)."""
    out = {k: getattr(spec, k) for k in HeadSpec.field_names() if getattr(spec, k, None) is not None}
    if spec.pooling is not None:
        out["pooling"] = spec.pooling_dict()
    return out


def build_embedder(spec: ModelConfig, *, device: str | torch.device = "cpu") -> Embedder:
    """Build the model a recipe describes.

    Args:
        spec: the recipe's ``model:`` block.
        device: ``cpu``/``cuda``/... or ``meta`` (shapes only: no memory, no weights read). A backbone
            preset (``spec.preset_overrides`` replacing its fields) builds with random weights: on a
            real device only with ``spec.tokenizer`` (to train from scratch).

    Returns:
        The Embedder, in eval mode; with ``spec.lora`` its backbone is a peft model in which
        only the adapters (and the pooling head) are trainable.
    """
    overrides = head_overrides(spec)
    preset = BACKBONE_PRESETS.get(spec.name_or_path)
    if preset is None:
        if spec.preset_overrides or spec.tokenizer:
            raise ConfigError("model.preset_overrides and model.tokenizer apply to backbone presets only")
        embedder = Embedder.load(spec.name_or_path, device=device, new_head=spec.new_head, **overrides)
    else:
        embedder = _from_preset(spec, preset, spec.preset_overrides or {}, device, overrides)
    if spec.lora is not None:
        if is_peft(embedder.backbone):  # the folder kept its adapter (merge_on_save: false): train it on
            check_adapter(embedder.backbone, spec.lora, spec.name_or_path)
            embedder.pooler.requires_grad_(True)
        else:
            apply_lora(embedder, spec.lora)
    elif is_peft(embedder.backbone):  # no LoRA in the recipe: every weight trains, the adapter merged in first
        merge_adapter_in(embedder)
    cast_frozen(embedder, _DTYPES[spec.dtype])
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(embedder.backbone)
    return embedder.eval()


def _from_preset(spec: ModelConfig, preset, config: dict, device, overrides: dict) -> Embedder:
    """A preset's backbone with random weights: shapes only (meta), or with ``spec.tokenizer`` a model to
    train from scratch (an mlm stage first)."""
    meta = str(device) == "meta"
    if not meta and spec.tokenizer is None:
        raise ConfigError(
            f"backbone preset {spec.name_or_path!r} has no weights and no tokenizer: give model.tokenizer to "
            "train it from random initialisation (an mlm stage), or start from a model folder or packaged name "
            "(without a tokenizer a preset builds shapes only: device=meta, `embforge plan`)"
        )
    from embforge.models.tokenizers import nomic_tokenizer

    if preset.family == "transformers":
        backbone = backbone_from_config(preset_config(spec.name_or_path, **config), device=device, init=True)
        tokenizer = None if meta else nomic_tokenizer(spec.tokenizer)
    else:  # nomic_bert, e.g. nomic-bert-2048: the encoder of Nomic Embed
        from embforge.models.nomic_bert import build_backbone
        from embforge.models.nomic_bert_config import from_name

        shape = from_name(spec.name_or_path, **config)
        backbone = build_backbone(shape, device=device)
        tokenizer = None if meta else nomic_tokenizer(spec.tokenizer, max_seq_len=shape.max_seq_len)
    vocab = backbone.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ConfigError(f"model.tokenizer has {len(tokenizer)} tokens but the preset's vocabulary only {vocab}")
    try:
        head = HeadSpec(**overrides)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc
    return Embedder(backbone, tokenizer, head)


def enable_gradient_checkpointing(backbone: torch.nn.Module) -> None:
    """Recompute each layer's forward in the backward pass (non-reentrant: frozen embeddings, as with
    LoRA, do not stop gradients from flowing through)."""
    if hasattr(backbone, "activation_checkpointing_enable"):  # the name of newer transformers 5.x releases
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not train to ``dtype``; trained ones become (or stay) float32 masters.

    Buffers (rotary frequencies) keep their dtype.
    """
    for p in module.parameters():
        target = dtype if not p.requires_grad else torch.float32
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def merge_adapter_in(embedder: Embedder) -> None:
    """Replace a peft backbone by the plain model with its LoRA deltas added (float32), every weight trainable."""
    backbone = embedder.backbone
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in backbone.parameters()):
        raise ConfigError("a LoRA adapter merges into float32 weights only; load the folder at fp32")
    embedder.backbone = backbone.merge_and_unload()
    embedder.backbone.requires_grad_(True)


def check_adapter(backbone, lora: LoraConfig, where: str) -> None:
    """The folder's LoRA adapter must be the one ``lora`` describes (it trains on from where it stopped).

    Its shape (rank, alpha, target modules) must match; dropout, which no weight depends on,
    becomes the recipe's.
    """
    saved = backbone.peft_config[backbone.active_adapter]
    have = {"r": saved.r, "alpha": saved.lora_alpha, "target_modules": sorted(saved.target_modules)}
    want = {"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    differing = [f"{k}: the folder's {have[k]!r}, the recipe's {want[k]!r}" for k in have if have[k] != want[k]]
    if differing:
        raise ConfigError(
            f"model.lora: {where} holds a LoRA adapter that the recipe's lora does not match ({'; '.join(differing)}); "
            "make them match to train the adapter on, or save the folder merged (merge_on_save: true) to start a new one"
        )
    saved.lora_dropout = lora.dropout
    for module in backbone.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and backbone.active_adapter in dropouts:
            dropouts[backbone.active_adapter] = torch.nn.Dropout(lora.dropout) if lora.dropout else torch.nn.Identity()


def apply_lora(embedder: Embedder, lora: LoraConfig) -> None:
    """Wrap the backbone with peft LoRA adapters: only they, and the pooling head, train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    try:
        embedder.backbone = get_peft_model(embedder.backbone, config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"model.lora: {exc}") from exc
    embedder.pooler.requires_grad_(True)
