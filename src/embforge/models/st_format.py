"""Reading and writing the sentence-transformers folder layout.

A saved embforge model is a plain sentence-transformers folder, so the ecosystem loads
it unchanged::

    config.json, model.safetensors, tokenizer files   (the transformers backbone, path "")
    modules.json                                     (Transformer -> Pooling [-> Normalize])
    sentence_bert_config.json                        (max_seq_length, do_lower_case)
    1_Pooling/config.json                            (pooling mode)
    2_Normalize/                                     (present iff embeddings are L2-normalised)
    config_sentence_transformers.json                (prompts, default prompt, similarity)

This module only handles the JSON side; it imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from embforge.errors import ConfigError

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"

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


@dataclass
class StLayout:
    """What a sentence-transformers folder says about the embedding pipeline."""

    backbone_dir: Path
    pooling: str = "mean"
    normalize: bool = True
    max_seq_len: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def _module_type(entry: dict) -> str:
    # sentence-transformers >= 5 moved the classes; keep only the class name
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def read_layout(folder: Path) -> StLayout:
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
        return StLayout(backbone_dir=folder)
    layout = StLayout(backbone_dir=folder, normalize=False)
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{modules_file}: expected a non-empty list of modules")
    kinds = [_module_type(m) for m in modules]
    if kinds[0] != "Transformer":
        raise ConfigError(f"{modules_file}: the first module must be a Transformer, got {kinds[0]!r}")
    for entry, kind in zip(modules, kinds):
        sub = folder / str(entry.get("path", ""))
        if kind == "Transformer":
            layout.backbone_dir = sub
            cfg_file = sub / "sentence_bert_config.json"
            if cfg_file.is_file():
                cfg = _read_json(cfg_file)
                layout.max_seq_len = cfg.get("max_seq_length")
                layout.do_lower_case = bool(cfg.get("do_lower_case", False))
        elif kind == "Pooling":
            layout.pooling = _read_pooling(sub / "config.json")
        elif kind == "Normalize":
            layout.normalize = True
        else:
            raise ConfigError(f"{modules_file}: module type {entry.get('type')!r} is not supported by embforge")
    st_cfg = folder / "config_sentence_transformers.json"
    if st_cfg.is_file():
        cfg = _read_json(st_cfg)
        layout.prompts = dict(cfg.get("prompts") or {})
        layout.default_prompt_name = cfg.get("default_prompt_name")
    return layout


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


def write_layout(folder: Path, *, hidden_size: int, layout: StLayout, versions: dict[str, str]) -> None:
    """Write the sentence-transformers JSON files for a backbone already saved in ``folder``."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
    ]
    if layout.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden_size}
    pooling.update({key: name == layout.pooling for name, key in _POOLING_KEYS.items()})
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    _write_json(folder / "modules.json", modules)
    _write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": layout.max_seq_len, "do_lower_case": layout.do_lower_case},
    )
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": versions,
            "prompts": layout.prompts,
            "default_prompt_name": layout.default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    )


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
