"""Reading and writing the sentence-transformers folder layout.

A saved embforge model is a plain sentence-transformers folder, so the ecosystem loads
it unchanged::

    config.json, model.safetensors, tokenizer files   (the transformers backbone, path "")
    modules.json                                     (Transformer -> Pooling [-> Normalize])
    sentence_bert_config.json                        (max_seq_length, do_lower_case)
    1_Pooling/config.json                            (pooling mode)
    2_LayerNorm/                                     (only with matryoshka_rule: layer_norm; unit weight, zero bias)
    2_Normalize/ or 3_Normalize/                     (present iff embeddings are L2-normalised)
    config_sentence_transformers.json                (prompts, default prompt, similarity)

This module only handles the JSON side (and the LayerNorm module's two vectors, through
``safetensors.numpy``); it imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_LAYER_NORM = "sentence_transformers.models.LayerNorm"

# pooling name <-> the legacy boolean keys every sentence-transformers version reads
_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
}
# sentence-transformers >= 5 also writes a single `pooling_mode` string
_POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
_UNSUPPORTED_POOLING_KEYS = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


class StFolder(NamedTuple):
    """A sentence-transformers (or bare transformers) folder: where its backbone is, and its head."""

    backbone_dir: Path
    head: HeadSpec  # max_seq_len None where the folder does not say (the backbone's maximum)


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def _module_type(entry: dict) -> str:
    # sentence-transformers >= 5 moved the classes; keep only the class name
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def read_layout(folder: Path) -> StFolder:
    """Parse a model folder: sentence-transformers layout, or a bare transformers folder.

    A bare transformers folder (``config.json`` without ``modules.json``) gets mean pooling
    and L2 normalisation, the usual choice for encoder embedding models.

    Raises:
        ConfigError: a module type embforge cannot reproduce exactly (e.g. Dense, max
            pooling), or malformed JSON (naming the file).
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: not a model folder (no modules.json and no config.json)")
        return StFolder(folder, HeadSpec())
    backbone_dir, head = folder, {"normalize": False}
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{modules_file}: expected a non-empty list of modules")
    kinds = [_module_type(m) for m in modules]
    if kinds[0] != "Transformer":
        raise ConfigError(f"{modules_file}: the first module must be a Transformer, got {kinds[0]!r}")
    for i, (entry, kind) in enumerate(zip(modules, kinds)):
        sub = folder / str(entry.get("path", ""))
        if kind == "Transformer":
            backbone_dir = sub
            cfg_file = sub / "sentence_bert_config.json"
            if cfg_file.is_file():
                cfg = _read_json(cfg_file)
                head["max_seq_len"] = cfg.get("max_seq_length")
                head["do_lower_case"] = bool(cfg.get("do_lower_case", False))
        elif kind == "Pooling":
            head["pooling"] = _read_pooling(sub / "config.json")
        elif kind == "Normalize":
            head["normalize"] = True
        elif kind == "LayerNorm" and "Pooling" in kinds[:i] and not head["normalize"] and "LayerNorm" not in kinds[:i]:
            # between pooling and normalisation: Nomic Embed v1.5's Matryoshka rule
            _check_identity_layer_norm(sub)
            head["matryoshka_rule"] = "layer_norm"
        else:
            raise ConfigError(f"{modules_file}: module type {entry.get('type')!r} is not supported by embforge")
    st_cfg = folder / "config_sentence_transformers.json"
    if st_cfg.is_file():
        cfg = _read_json(st_cfg)
        head["prompts"] = dict(cfg.get("prompts") or {})
        head["default_prompt_name"] = cfg.get("default_prompt_name")
    try:
        return StFolder(backbone_dir, HeadSpec(**head))
    except ValueError as exc:
        raise ConfigError(f"{folder}: {exc}") from exc


def _check_identity_layer_norm(folder: Path) -> None:
    """A LayerNorm module is Nomic's non-affine layer norm only with unit weight and zero bias."""
    import numpy as np
    from safetensors.numpy import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder}: a LayerNorm module needs its model.safetensors (norm.weight, norm.bias)")
    tensors = load_file(str(weights))
    weight, bias = tensors.get("norm.weight"), tensors.get("norm.bias")
    if weight is None or bias is None or not (np.all(weight == 1) and np.all(bias == 0)):
        raise ConfigError(
            f"{weights}: only a non-affine LayerNorm (weight 1, bias 0; Nomic Embed v1.5's Matryoshka rule) "
            "is supported, this one has trained weights"
        )


def _read_pooling(path: Path) -> str:
    cfg = _read_json(path)
    if cfg.get("include_prompt") is False:
        raise ConfigError(f"{path}: include_prompt=false (prompt-excluded pooling) is not supported yet")
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        if mode not in _POOLING_NAMES:
            raise ConfigError(f"{path}: pooling_mode {mode!r} is not supported; supported: {sorted(_POOLING_NAMES)}")
        return _POOLING_NAMES[mode]
    bad = [k for k in _UNSUPPORTED_POOLING_KEYS if cfg.get(k)]
    active = [name for name, key in _POOLING_KEYS.items() if cfg.get(key)]
    if bad or len(active) != 1:
        raise ConfigError(f"{path}: exactly one of {sorted(_POOLING_KEYS.values())} must be true, got {cfg}")
    return active[0]


def write_layout(folder: Path, *, hidden_size: int, head: HeadSpec, versions: dict[str, str]) -> None:
    """Write the sentence-transformers JSON files for a backbone already saved in ``folder``.

    ``head`` must fit sentence-transformers' modules (:meth:`HeadSpec.fits_sentence_transformers`).
    """
    if not head.fits_sentence_transformers():
        raise ValueError(f"sentence-transformers' modules cannot compute this head: {head}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
    ]
    if head.matryoshka_rule == "layer_norm":  # nn.LayerNorm with weight 1 and bias 0 = the non-affine one
        import numpy as np
        from safetensors.numpy import save_file

        (folder / "2_LayerNorm").mkdir(exist_ok=True)
        write_json(folder / "2_LayerNorm" / "config.json", {"dimension": hidden_size})
        norm = {"norm.weight": np.ones(hidden_size, np.float32), "norm.bias": np.zeros(hidden_size, np.float32)}
        save_file(norm, str(folder / "2_LayerNorm" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": ST_LAYER_NORM})
    if head.normalize:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": ST_NORMALIZE})
        (folder / f"{n}_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden_size}
    pooling.update({key: name == head.pooling_name for name, key in _POOLING_KEYS.items()})
    (folder / "1_Pooling").mkdir(exist_ok=True)
    write_json(folder / "1_Pooling" / "config.json", pooling)
    write_json(folder / "modules.json", modules)
    write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": head.max_seq_len, "do_lower_case": head.do_lower_case},
    )
    write_prompts(folder, head, versions)


def write_prompts(folder: Path, head: HeadSpec, versions: dict[str, str]) -> None:
    """``config_sentence_transformers.json``: the head's prompts and default prompt, cosine similarity."""
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": versions,
            "prompts": head.prompts,
            "default_prompt_name": head.default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    )


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
