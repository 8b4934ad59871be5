"""The released nomic-embed-text / nomic-bert checkpoint layout (written by ``contrastors``).

Such a folder has a GPT-2-style ``config.json`` (``model_type: nomic_bert``, ``n_embd``,
``n_layer``, ``n_head``, ``n_inner``, ``rotary_emb_base``, ``qkv_proj_bias``, ...) and
weights named ``embeddings.word_embeddings``, ``emb_ln``, ``encoder.layers.N.attn.Wqkv``
(q, k, v stacked), ``attn.out_proj``, ``mlp.fc11`` / ``fc12`` / ``fc2``, ``norm1``, ``norm2``.
Its own model class is remote code; here it loads into transformers' native
``NomicBertModel`` without ``trust_remote_code``:

- the config is translated here (the native ``NomicBertConfig`` does not read GPT-2 keys:
  it would silently fall back to its 768-wide defaults);
- the weights are renamed by transformers itself: its ``nomic_bert`` conversion mapping
  turns the contrastors names into the native ones when loading, and ``save_pretrained``
  writes them back under the contrastors names, so :func:`save_contrastors` only writes
  the GPT-2-style config beside them.

Checkpoints of MLM pre-training (``bert.``-prefixed, with a ``cls.`` head) load as a
backbone too; the head and a BERT pooler are not part of the embedding model and are skipped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from embforge.atomic import atomic_folder
from embforge.errors import CheckpointError, ConfigError
from embforge.models.nomic_bert import NomicBertConfig, NomicBertModel, apply_dynamic_ntk
from embforge.models.nomic_bert_config import pad_vocab_size

# contrastors' NomicBertConfig defaults, over GPT2Config's, for every key that shapes the model
DEFAULTS = {
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "n_positions": 1024,
    "vocab_size": 50257,
    "pad_vocab_size_multiple": 1,
    "type_vocab_size": 2,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "rotary_emb_fraction": 0.0,
    "rotary_emb_base": 10_000,
    "rotary_emb_scale_base": None,
    "rotary_emb_interleaved": False,
    "rotary_scaling_factor": None,
    "max_trained_positions": 2048,
    "qkv_proj_bias": True,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
    "prenorm": False,
    "parallel_block": False,
    "use_rms_norm": False,
    "causal": False,
    "num_heads_kv": None,
    "pad_token_id": 0,
    "initializer_range": 0.02,
}
# architecture switches the native model does not have: they must be off
MUST_BE_FALSE = (
    "prenorm",
    "parallel_block",
    "use_rms_norm",
    "causal",
    "rotary_emb_interleaved",
    "qkv_proj_bias",
    "mlp_fc1_bias",
    "mlp_fc2_bias",
)
# keys that do not change the inference graph (dropout, fused kernels, bookkeeping)
INERT = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "fused_bias_fc",
    "fused_dropout_add_ln",
    "use_flash_attn",
    "use_xentropy",
    "dense_seq_output",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "tie_word_embeddings",
    "parallel_block_tied_norm",
    "n_ctx",
    "add_pooling_layer",
    "last_layer_subset",
    "rotary_head_dim",
    "gradient_checkpointing",
}
# contrastors' activation_function -> the gate activation of the native gated MLP
GATE_ACT = {"swiglu": "silu", "geglu": "gelu", "glu": "sigmoid"}
GATED_MULTIPLE = 256  # contrastors' gated MLP rounds its hidden size up to a multiple of 256
SKIPPED_PREFIXES = ("cls.", "pooler.")  # MLM head and BERT pooler: not part of the embedding model


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"{folder}: no config.json")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return cfg


def is_contrastors_folder(path: str | Path) -> bool:
    """True for a folder whose config.json is a contrastors nomic_bert config (GPT-2-style keys)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    try:
        cfg = _read_config(folder)
    except ConfigError:
        return False
    return cfg.get("model_type") == "nomic_bert" and "n_embd" in cfg and "n_layer" in cfg


def hf_config_from_contrastors(raw: dict, where: str = "config.json", rope_scaling_factor: float | None = None):
    """Translate a contrastors config into a native ``NomicBertConfig``.

    Args:
        raw: the parsed config.json.
        where: its path, for error messages.
        rope_scaling_factor: overrides the file's ``rotary_scaling_factor`` (contrastors'
            ``from_pretrained(..., rotary_scaling_factor=2)``: 8,192 tokens from a 2,048 model).

    Raises:
        ConfigError: a feature the native model does not have (pre-norm, biases,
            partial or interleaved rotary, learned positions, ...), naming the key.
    """
    unknown = sorted(set(raw) - set(DEFAULTS) - INERT)
    if unknown:
        warnings.warn(f"{where}: ignoring config keys embforge does not know: {unknown}", stacklevel=2)
    cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
    for key in MUST_BE_FALSE:
        if cfg[key]:
            raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported (nomic-bert has it false)")
    if cfg["rotary_emb_fraction"] != 1.0:
        raise ConfigError(
            f"{where}: rotary_emb_fraction={cfg['rotary_emb_fraction']!r} is not supported "
            "(only full rotary, 1.0; 0 means learned positions)"
        )
    if cfg["rotary_emb_scale_base"] is not None:
        raise ConfigError(f"{where}: rotary_emb_scale_base (xPos) is not supported")
    if cfg["activation_function"] not in GATE_ACT:
        raise ConfigError(
            f"{where}: activation_function={cfg['activation_function']!r} is not supported; "
            f"nomic-bert uses a gated MLP: one of {sorted(GATE_ACT)}"
        )
    if cfg["num_heads_kv"] not in (None, cfg["n_head"]):
        raise ConfigError(f"{where}: num_heads_kv={cfg['num_heads_kv']} (grouped-query attention) is not supported")
    if cfg["type_vocab_size"] < 1:
        raise ConfigError(f"{where}: type_vocab_size must be >= 1 (the native model has token-type embeddings)")
    hidden = cfg["n_embd"]
    inner = cfg["n_inner"] if cfg["n_inner"] is not None else int(8 * hidden / 3)
    inner = -(-inner // GATED_MULTIPLE) * GATED_MULTIPLE
    factor = rope_scaling_factor if rope_scaling_factor is not None else cfg["rotary_scaling_factor"]
    rope = {"rope_type": "default", "rope_theta": float(cfg["rotary_emb_base"])}
    if factor:
        rope = {"rope_type": "dynamic", "factor": float(factor), "rope_theta": float(cfg["rotary_emb_base"])}
    return NomicBertConfig(
        vocab_size=pad_vocab_size(cfg["vocab_size"], cfg["pad_vocab_size_multiple"]),
        hidden_size=hidden,
        num_hidden_layers=cfg["n_layer"],
        num_attention_heads=cfg["n_head"],
        intermediate_size=inner,
        hidden_act=GATE_ACT[cfg["activation_function"]],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg["max_trained_positions"],
        type_vocab_size=cfg["type_vocab_size"],
        layer_norm_eps=cfg["layer_norm_epsilon"],
        pad_token_id=cfg["pad_token_id"] if cfg["pad_token_id"] is not None else 0,
        initializer_range=cfg["initializer_range"],
        rope_parameters=rope,
    )


def contrastors_config(config, max_seq_len: int | None = None) -> dict:
    """The GPT-2-style config.json of a native ``NomicBertConfig`` (inverse of the above).

    Raises:
        ConfigError: the model cannot be written in this layout (the intermediate size
            is not a multiple of 256, which contrastors' gated MLP would round up).
    """
    if config.intermediate_size % GATED_MULTIPLE:
        raise ConfigError(
            f"intermediate_size {config.intermediate_size} cannot be written in the contrastors layout: "
            f"its gated MLP rounds the hidden size up to a multiple of {GATED_MULTIPLE}"
        )
    rope = config.rope_parameters
    act = {v: k for k, v in GATE_ACT.items()}.get(config.hidden_act)
    if act is None:
        raise ConfigError(f"hidden_act {config.hidden_act!r} has no contrastors activation_function")
    return {
        "model_type": "nomic_bert",
        "architectures": ["NomicBertModel"],
        "activation_function": act,
        "n_embd": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_inner": config.intermediate_size,
        "n_positions": max_seq_len or config.max_position_embeddings,
        "max_trained_positions": config.max_position_embeddings,
        "rotary_emb_base": rope["rope_theta"],
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": rope.get("factor") if rope.get("rope_type") == "dynamic" else None,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "prenorm": False,
        "parallel_block": False,
        "use_rms_norm": False,
        "causal": False,
        "layer_norm_epsilon": config.layer_norm_eps,
        "type_vocab_size": config.type_vocab_size,
        "vocab_size": config.vocab_size,
        "pad_vocab_size_multiple": 64 if config.vocab_size % 64 == 0 else 1,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "tie_word_embeddings": True,
    }


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def load_contrastors_backbone(
    path: str | Path, *, rope_scaling_factor: float | None = None, device: str | torch.device | None = None
):
    """Load a contrastors folder offline into a native ``NomicBertModel`` (no remote code).

    Args:
        path: the folder (config.json + model.safetensors or pytorch_model.bin, optional tokenizer).
        rope_scaling_factor: dynamic NTK factor overriding the file's ``rotary_scaling_factor``.
        device: where to put the model (default CPU).

    Returns:
        (model in eval mode, tokenizer or None when the folder has no tokenizer files).

    Raises:
        ConfigError: not a supported contrastors config.
        CheckpointError: weights missing, unexpected or of the wrong shape (named).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    config = hf_config_from_contrastors(_read_config(folder), str(folder / "config.json"), rope_scaling_factor)
    try:
        model, info = NomicBertModel.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            output_loading_info=True,
            key_mapping={r"^bert\.": ""},  # MLM pre-training checkpoints prefix the encoder with "bert."
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load the contrastors weights: {exc}") from exc
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(SKIPPED_PREFIXES))
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": unexpected,
        "wrong shape": sorted(str(k) for k in info["mismatched_keys"]),
    }
    if any(problems.values()):
        listed = "; ".join(f"{k}: {v[:6]}" for k, v in problems.items() if v)
        raise CheckpointError(f"{folder}: the weights do not match config.json ({listed})")
    apply_dynamic_ntk(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if _has_tokenizer(folder) else None
    return model.to(device or "cpu"), tokenizer


def save_contrastors(model, path: str | Path, tokenizer=None, *, max_seq_len: int | None = None) -> Path:
    """Write a native ``NomicBertModel`` as a contrastors folder, atomically.

    Args:
        model: the backbone.
        path: the folder to write (replaced if it exists).
        tokenizer: saved beside the weights when given.
        max_seq_len: recorded as ``n_positions`` (default: the trained length).

    Returns:
        ``path``.
    """
    if not isinstance(model, NomicBertModel):
        raise ConfigError(f"save_contrastors needs a NomicBertModel, got {type(model).__name__}")
    config = contrastors_config(model.config, max_seq_len)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)  # transformers writes the contrastors weight names (its conversion mapping)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").unlink(missing_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
