"""Model folders: what :meth:`Embedder.save` writes and :meth:`Embedder.load` reads.

Two layouts, chosen by what the model needs:

- **sentence-transformers** (encoders with a parameter-free pooling, e.g. the packaged
  MiniLM): ``config.json`` + ``model.safetensors`` of the backbone, ``modules.json``
  (Transformer -> Pooling [-> Normalize]), see :mod:`embforge.models.st_format`.
- **embforge** (decoders, trainable heads, instruction masking, EOS, dynamic NTK rotary): ::

    config.json                 EmbforgeConfig: the backbone's config nested + the head spec,
                                with auto_map -> modeling_embforge.EmbforgeModel
    model.safetensors           backbone.* and pooler.* (LoRA merged unless kept as an adapter)
    modeling_embforge.py, ...   a copy of the package embforge/modeling/ (forward pass, tokeniser)
    embforge.json               the Embedder's head spec (modeling.head.HeadSpec), format, versions
    modules.json                one sentence-transformers module: modeling_embforge.EmbforgeSTModule
    config_sentence_transformers.json, tokenizer files
    adapter/                    only with merge_lora=False: the peft adapter (float32)

Both carry a README.md whose snippet embeds with plain ``transformers``. LoRA deltas are
merged in float32, then every weight is cast to the dtype asked for (``float32`` by
default: a bf16 cast of a merged weight rounds away deltas below its bf16 resolution).
Both are written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import embforge.modeling
from embforge.atomic import atomic_folder, require_complete
from embforge.errors import CheckpointError, ConfigError
from embforge.modeling.head import HeadSpec
from embforge.modeling.pooling import Pooling
from embforge.models.model_card import write_model_card
from embforge.models.st_format import read_layout, write_json, write_layout, write_prompts

EMBFORGE_FILE = "embforge.json"
EMBFORGE_FORMAT = 2  # 2: the modeling package (several files); embforge.json holds the head spec (HeadSpec)
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BACKBONE_CONFIG_DROP = (
    "quantization_config",
    "_name_or_path",
    "transformers_version",
    "architectures",
    "auto_map",
    "dtype",  # the weights' dtype is the file's business: a backbone is always built in float32
    "torch_dtype",
)


# ---------------------------------------------------------------------------- weights
def is_peft(backbone: torch.nn.Module) -> bool:
    return hasattr(backbone, "peft_config") and hasattr(backbone, "get_base_model")


def backbone_state(backbone: torch.nn.Module, *, merge_lora: bool = True) -> tuple[torch.nn.Module, dict]:
    """The plain transformers model and its state dict under its own key names.

    With a peft-wrapped backbone, LoRA deltas are added to the base weights in float32
    (``merge_lora``: merged weights come out float32, whatever the base's dtype) or left
    out (the adapter is saved separately); the live model is not modified either way.
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
                    state[key] = state[key].float() + module.get_delta_weight(adapter).float()
    return base, state


def own_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies (safetensors refuses shared storage, e.g. tied embeddings); floats cast to ``dtype``."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.clone().contiguous()
    return out


def save_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise ConfigError(f"save dtype must be one of {sorted(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def backbone_config_dict(config) -> dict:
    cfg = config.to_dict()
    for key in _BACKBONE_CONFIG_DROP:
        cfg.pop(key, None)
    return cfg


# ---------------------------------------------------------------------------- save
def needs_own_code(backbone_config) -> bool:
    """Whether the backbone computes differently under plain transformers (nomic-bert's dynamic NTK:
    transformers' own rotary keeps state across calls, see :mod:`embforge.modeling.rotary`)."""
    rope = getattr(backbone_config, "rope_parameters", None) or {}
    return backbone_config.model_type == "nomic_bert" and rope.get("rope_type") == "dynamic"


def _is_plain_st(embedder, merge_lora: bool) -> bool:
    """Whether sentence-transformers' own modules compute ``embedder`` (its head, and its backbone in transformers)."""
    return (
        embedder.head.fits_sentence_transformers()
        and isinstance(embedder.pooler, Pooling)
        and not embedder.is_decoder
        and getattr(embedder.tokenizer, "truncation_side", "right") == "right"
        and not needs_own_code(embedder.backbone.config)
        and (merge_lora or not is_peft(embedder.backbone))
    )


def save_folder(embedder, path: Path, *, merge_lora: bool = True, dtype: str = "float32") -> Path:
    """Write ``embedder`` to ``path`` atomically (see the module docstring for the layouts)."""
    from embforge.version import __version__

    versions = {"embforge": __version__, "torch": torch.__version__}
    cast = save_dtype(dtype)
    with atomic_folder(path) as tmp:
        base, state = backbone_state(embedder.backbone, merge_lora=merge_lora)
        state = own_tensors(state, cast)
        embedder.tokenizer.save_pretrained(tmp)
        if _is_plain_st(embedder, merge_lora):
            base.save_pretrained(tmp, state_dict=state)
            write_layout(tmp, hidden_size=embedder.hidden_size, head=embedder.head, versions=versions)
            write_model_card(tmp, embedder, plain=True)
        else:
            _write_embforge_folder(embedder, tmp, base.config, state, versions, cast)
            if not merge_lora and is_peft(embedder.backbone):
                embedder.backbone.save_pretrained(tmp / "adapter")
            write_model_card(tmp, embedder, plain=False)
    return path


def copy_modeling_package(folder: Path) -> None:
    """Copy every file of :mod:`embforge.modeling` (flat: transformers follows their relative imports)."""
    source = Path(embforge.modeling.__file__).parent
    for name in embforge.modeling.MODELING_FILES:
        shutil.copyfile(source / name, folder / name)


def _write_embforge_folder(
    embedder, folder: Path, backbone_config, state: dict, versions: dict, cast: torch.dtype
) -> None:
    from embforge.modeling.modeling_embforge import EmbforgeConfig

    head = embedder.head
    entry = embforge.modeling.ENTRY_MODULE
    config = EmbforgeConfig(
        backbone=backbone_config_dict(backbone_config),
        head=head.to_dict(),
        architectures=["EmbforgeModel"],
        auto_map={"AutoConfig": f"{entry}.EmbforgeConfig", "AutoModel": f"{entry}.EmbforgeModel"},
    )
    config.save_pretrained(folder)
    tensors = {f"backbone.{k}": v for k, v in state.items()}
    tensors.update({f"pooler.{k}": v for k, v in own_tensors(embedder.pooler.state_dict(), cast).items()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    copy_modeling_package(folder)
    write_json(folder / EMBFORGE_FILE, {**head.to_dict(), "format": EMBFORGE_FORMAT, "versions": versions})
    module = f"{entry}.EmbforgeSTModule"
    write_json(folder / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": module}])
    write_prompts(folder, head, versions)


# ---------------------------------------------------------------------------- load
@dataclass
class LoadedFolder:
    """What a model folder holds: the backbone (float32), its tokenizer, its head spec, the head's weights."""

    backbone: torch.nn.Module
    tokenizer: object
    head: HeadSpec
    pooler_state: dict[str, torch.Tensor]  # the trained head's tensors ({} for none, and on meta)
    trained_head: bool  # the folder holds head weights (also when built on meta, which reads none)


def load_folder(folder: Path, *, weights: bool = True) -> LoadedFolder:
    """Read a model folder (weights as float32, whatever dtype they were saved in).

    ``weights=False`` builds the backbone on the ``meta`` device from the folder's config and
    reads no weights (FSDP ranks that receive their shards from rank 0); the pooler state is
    then empty.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy: import on use

    from embforge.models.contrastors import is_contrastors_folder, load_contrastors_backbone
    from embforge.models.tokenizers import nomic_tokenizer

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
            backbone = AutoModel.from_pretrained(layout.backbone_dir, local_files_only=True, dtype=torch.float32)
        else:
            with torch.device("meta"):
                backbone = AutoModel.from_config(AutoConfig.from_pretrained(layout.backbone_dir, local_files_only=True))
    return LoadedFolder(backbone, tokenizer, layout.head, {}, trained_head=False)


def _load_embforge_folder(folder: Path, *, weights: bool = True) -> LoadedFolder:
    from transformers import AutoTokenizer

    try:
        settings = json.loads((folder / EMBFORGE_FILE).read_text(encoding="utf-8"))  # the HeadSpec
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder}: unreadable embforge model folder: {exc}") from exc
    if settings.get("format") != EMBFORGE_FORMAT:
        raise ConfigError(
            f"{folder / EMBFORGE_FILE}: format {settings.get('format')!r}, this embforge reads {EMBFORGE_FORMAT}; "
            "load the folder with the embforge version that wrote it and save it again"
        )
    spec = {k: v for k, v in settings.items() if k not in ("format", "versions")}
    if config.get("head", spec) != spec:  # config.json carries the spec too (for the remote code)
        raise ConfigError(
            f"{folder}: config.json's head differs from embforge.json (edited by hand?): transformers and "
            "embforge would embed differently; make them equal, or save the model again with Embedder.save"
        )
    file = folder / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: model.safetensors is missing")
    if not weights:
        backbone = backbone_from_config(config["backbone"], device="meta")
        with safe_open(str(file), "pt") as f:  # the header only: which tensors, no data
            trained_head = any(k.startswith("pooler.") for k in f.keys())
        tensors = {}
    else:
        tensors = load_file(str(file))
        backbone = backbone_from_config(config["backbone"])
        bb_state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        load_state_strict(backbone, bb_state, f"{file} (backbone)")
    if (folder / "adapter").is_dir():
        backbone = _with_adapter(backbone, folder / "adapter", weights=weights)
    pooler_state = {k.removeprefix("pooler."): v.float() for k, v in tensors.items() if k.startswith("pooler.")}
    if weights:
        trained_head = bool(pooler_state)
    # trust_remote_code=False: the tokenizer needs none of the folder's code (and must never prompt)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    try:
        head = HeadSpec.from_dict(spec, str(folder / EMBFORGE_FILE))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return LoadedFolder(backbone, tokenizer, head, pooler_state, trained_head)


def _with_adapter(backbone: torch.nn.Module, adapter: Path, *, weights: bool) -> torch.nn.Module:
    """The backbone wrapped with the folder's LoRA adapter (trainable); on meta, its structure only."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if weights:
        return PeftModel.from_pretrained(backbone, str(adapter), is_trainable=True)
    config = PeftConfig.from_pretrained(str(adapter))
    config.inference_mode = False
    with torch.device("meta"):  # the same modules as from_pretrained builds, no weights read
        return get_peft_model(backbone, config)


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


def model_folder(name_or_path: str | Path) -> Path:
    """The local folder of a known model name or a path (:func:`resolve_model_path`), converting a
    packaged GGUF decoder into its cached folder on first use (:func:`convert_gguf`)."""
    from embforge.models.registry import KNOWN_MODELS, GgufModel, resolve_model_path

    known = KNOWN_MODELS.get(str(name_or_path))
    if isinstance(known, GgufModel) and not Path(name_or_path).expanduser().is_dir():
        source = known.source()
        if source is not None and not known.converted():
            convert_gguf(source, known.gguf_file, known.path())
    return resolve_model_path(name_or_path)


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
