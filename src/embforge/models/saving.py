"""Model folders: what :meth:`Embedder.save` writes and :meth:`Embedder.load` reads.

Two layouts, chosen by what the model needs:

- **sentence-transformers** (encoders with a parameter-free pooling, e.g. the packaged
  MiniLM): ``config.json`` + ``model.safetensors`` of the backbone, ``modules.json``
  (Transformer -> Pooling [-> Normalize]), see :mod:`embforge.models.st_format`.
- **embforge** (decoders, trainable heads, instruction masking, EOS): ::

    config.json                 EmbforgeConfig: the backbone's config nested + the head's settings,
                                with auto_map -> embforge_modeling.EmbforgeModel
    model.safetensors           backbone.* and pooler.* (LoRA merged unless kept as an adapter)
    embforge_modeling.py        a copy of embforge/models/portable.py (the forward pass)
    embforge.json               prompts, max length, padding side, instruction template, versions
    modules.json                one sentence-transformers module: embforge_modeling.EmbforgeSTModule
    config_sentence_transformers.json, tokenizer files
    adapter/                    only with merge_lora=False: the peft adapter

Both are written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embforge.atomic import atomic_folder, require_complete
from embforge.errors import CheckpointError, ConfigError
from embforge.models import portable
from embforge.models.st_format import StLayout, read_layout, write_json, write_layout

EMBFORGE_FILE = "embforge.json"
_BACKBONE_CONFIG_DROP = ("quantization_config", "_name_or_path", "transformers_version", "architectures", "auto_map")


# ---------------------------------------------------------------------------- weights
def is_peft(backbone: torch.nn.Module) -> bool:
    return hasattr(backbone, "peft_config") and hasattr(backbone, "get_base_model")


def backbone_state(backbone: torch.nn.Module, *, merge_lora: bool = True) -> tuple[torch.nn.Module, dict]:
    """The plain transformers model and its state dict under its own key names.

    With a peft-wrapped backbone, LoRA deltas are added to the base weights
    (``merge_lora``) or left out (the adapter is saved separately); the live model is
    not modified either way.
    """
    if not is_peft(backbone):
        return backbone, backbone.state_dict()
    base = backbone.get_base_model()
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    if merge_lora:
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                for adapter in module.active_adapters:
                    key = f"{name}.weight"
                    state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return base, state


def own_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): clone makes every tensor its own
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def backbone_config_dict(config) -> dict:
    cfg = config.to_dict()
    for key in _BACKBONE_CONFIG_DROP:
        cfg.pop(key, None)
    return cfg


# ---------------------------------------------------------------------------- save
def _is_plain_st(embedder, merge_lora: bool) -> bool:
    return (
        not embedder.is_decoder
        and isinstance(embedder.pooler, portable.Pooling)
        and embedder.pool_prompt
        and not embedder.add_eos
        and embedder.tokenizer.padding_side == "right"
        and embedder.instruction_template is None
        and (merge_lora or not is_peft(embedder.backbone))
    )


def save_folder(embedder, path: Path, *, merge_lora: bool = True) -> Path:
    """Write ``embedder`` to ``path`` atomically (see the module docstring for the layouts)."""
    import embforge

    versions = {"embforge": embforge.__version__, "torch": torch.__version__}
    with atomic_folder(path) as tmp:
        base, state = backbone_state(embedder.backbone, merge_lora=merge_lora)
        embedder.tokenizer.save_pretrained(tmp)
        if _is_plain_st(embedder, merge_lora):
            base.save_pretrained(tmp, state_dict=own_tensors(state))
            layout = StLayout(
                backbone_dir=tmp,
                pooling=embedder.pooler.name,
                normalize=embedder.normalize,
                max_seq_len=embedder.max_seq_len,
                do_lower_case=embedder.do_lower_case,
                prompts=embedder.prompts,
                default_prompt_name=embedder.default_prompt_name,
                matryoshka_rule=embedder.matryoshka_rule,
            )
            write_layout(tmp, hidden_size=embedder.hidden_size, layout=layout, versions=versions)
        else:
            _write_embforge_folder(embedder, tmp, base.config, state, versions)
            if not merge_lora and is_peft(embedder.backbone):
                embedder.backbone.save_pretrained(tmp / "adapter")
    return path


def _write_embforge_folder(embedder, folder: Path, backbone_config, state: dict, versions: dict) -> None:
    config_cls, _ = portable._embforge_classes()
    settings = embedder.head_settings()
    config = config_cls(
        backbone=backbone_config_dict(backbone_config),
        pooling=settings["pooling"],
        bidirectional=embedder.attention == "bidirectional",
        normalize=embedder.normalize,
        add_eos=embedder.add_eos,
        pool_prompt=embedder.pool_prompt,
        matryoshka_rule=embedder.matryoshka_rule,
        architectures=["EmbforgeModel"],
        auto_map={
            "AutoConfig": f"{Path(portable.MODELING_FILE).stem}.EmbforgeConfig",
            "AutoModel": f"{Path(portable.MODELING_FILE).stem}.EmbforgeModel",
        },
    )
    config.save_pretrained(folder)
    tensors = {f"backbone.{k}": v for k, v in state.items()}
    tensors.update({f"pooler.{k}": v for k, v in embedder.pooler.state_dict().items()})
    save_file(own_tensors(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(Path(portable.__file__), folder / portable.MODELING_FILE)
    write_json(folder / EMBFORGE_FILE, {**settings, "format": 1, "versions": versions})
    module = f"{Path(portable.MODELING_FILE).stem}.EmbforgeSTModule"
    write_json(folder / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": module}])
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": versions,
            "prompts": embedder.prompts,
            "default_prompt_name": embedder.default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    )


# ---------------------------------------------------------------------------- load
def load_folder(folder: Path, *, weights: bool = True) -> tuple[torch.nn.Module, object, dict, dict]:
    """Read a model folder -> (backbone, tokenizer, Embedder keyword arguments, pooler state).

    ``weights=False`` builds the backbone on the ``meta`` device from the folder's config and
    reads no weights (FSDP ranks that receive their shards from rank 0); the pooler state is
    then empty.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy: import on use

    from embforge.models.contrastors import is_contrastors_folder, load_contrastors_backbone
    from embforge.models.nomic_bert import apply_dynamic_ntk, nomic_tokenizer

    require_complete(folder, "model folder")  # a file missing or cut short: named here, not deep in transformers
    if (folder / EMBFORGE_FILE).is_file():
        return _load_embforge_folder(folder, weights=weights)
    layout = read_layout(folder)
    if is_contrastors_folder(layout.backbone_dir):  # nomic-embed-text folders written by contrastors
        if not weights:
            raise ConfigError(
                f"{folder}: a contrastors-layout folder cannot be built without its weights (meta); "
                "load it once and save it with Embedder.save, then train from that folder"
            )
        backbone, tokenizer = load_contrastors_backbone(layout.backbone_dir)
        tokenizer = tokenizer or nomic_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(layout.backbone_dir, local_files_only=True)
        if weights:
            backbone = AutoModel.from_pretrained(layout.backbone_dir, local_files_only=True)
        else:
            with torch.device("meta"):
                backbone = AutoModel.from_config(AutoConfig.from_pretrained(layout.backbone_dir, local_files_only=True))
        backbone = apply_dynamic_ntk(backbone)
    kwargs = dict(
        pooling=layout.pooling,
        normalize=layout.normalize,
        max_seq_len=layout.max_seq_len,
        prompts=layout.prompts,
        default_prompt_name=layout.default_prompt_name,
        do_lower_case=layout.do_lower_case,
        matryoshka_rule=layout.matryoshka_rule,
    )
    return backbone, tokenizer, kwargs, {}


def _load_embforge_folder(folder: Path, *, weights: bool = True) -> tuple[torch.nn.Module, object, dict, dict]:
    from transformers import AutoTokenizer

    from embforge.models.nomic_bert import apply_dynamic_ntk

    try:
        settings = json.loads((folder / EMBFORGE_FILE).read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder}: unreadable embforge model folder: {exc}") from exc
    file = folder / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: model.safetensors is missing")
    if not weights:
        if (folder / "adapter").is_dir():
            raise ConfigError(
                f"{folder}: a folder with a separate LoRA adapter cannot be built on meta; save it merged"
            )
        backbone = apply_dynamic_ntk(backbone_from_config(config["backbone"], device="meta"))
        tensors = {}
    else:
        tensors = load_file(str(file))
        backbone = apply_dynamic_ntk(backbone_from_config(config["backbone"]))
        bb_state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        load_state_strict(backbone, bb_state, f"{file} (backbone)")
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, str(folder / "adapter"), is_trainable=True)
    pooler_state = {k.removeprefix("pooler."): v for k, v in tensors.items() if k.startswith("pooler.")}
    # trust_remote_code=False: the tokenizer needs none of the folder's code (and must never prompt)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    kwargs = {k: v for k, v in settings.items() if k not in ("format", "versions")}
    return backbone, tokenizer, kwargs, pooler_state


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' warning that an ``embforge`` config is not the tokenizer's model type."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def backbone_from_config(config: dict, *, device: str | torch.device = "cpu", init: bool = False) -> torch.nn.Module:
    """A transformers base model from a config dict.

    Args:
        config: ``model_type`` plus the config's fields.
        device: ``meta`` allocates nothing (parameter counts, memory plans).
        init: randomly initialise the weights; False leaves them uninitialised, for loading
            weights right after (buffers such as rotary frequencies are always computed).
    """
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device), contextlib.nullcontext() if init or device == "meta" else no_init_weights():
        return AutoModel.from_config(hf_config)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module``, naming missing and unexpected keys."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.load_state_dict(state)


def convert_gguf(source: Path, gguf_file: str, target: Path) -> Path:
    """Dequantise a GGUF decoder once into a transformers folder (base model + tokenizer), atomically.

    Loading a GGUF file takes 30-45 s and the result cannot ``save_pretrained`` directly; the
    converted folder loads in about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"embforge: converting {gguf_file} once into {target} (about a minute)", flush=True)
    with atomic_folder(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        base = backbone_from_config(backbone_config_dict(lm.config))
        load_state_strict(base, lm.model.state_dict(), f"{source / gguf_file}")
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
