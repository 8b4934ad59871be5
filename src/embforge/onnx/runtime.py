"""Inference on an exported ONNX model with ONNX Runtime: no torch, no transformers.

An exported folder (``embforge export onnx MODEL OUT``) holds ``model.onnx`` (the whole
:meth:`Embedder.forward`: backbone, pooling, normalisation), optionally ``model_int8.onnx``
(dynamic int8 quantisation), the tokenizer as ``tokenizer.json`` and ``embforge_onnx.json``
(prompts, maximum length, normalisation). :class:`OnnxEmbedder` mirrors the inference API
of :class:`~embforge.models.embedder.Embedder`::

    emb = OnnxEmbedder.load("runs/minilm-onnx", quantized=True)
    vecs = emb.encode(["how do I sort a list?"], dimensions=128)

Only ``onnxruntime``, ``tokenizers`` and ``numpy`` are imported, so a process that embeds
through this path starts in well under a second after Python itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embforge.errors import ConfigError
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.matryoshka import check_dimensions, truncate_dimensions
from embforge.models.prompts import resolve_prompt
from embforge.optional import require

ONNX_CONFIG = "embforge_onnx.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
FORMAT_VERSION = 1
# a progress bar appears past this many batches


def is_onnx_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``embforge export onnx``."""
    return (Path(path) / ONNX_CONFIG).is_file()


class OnnxEmbedder:
    """Text -> embedding with ONNX Runtime on CPU.

    Args:
        folder: an exported folder (see the module docstring).
        quantized: run ``model_int8.onnx`` instead of ``model.onnx``.
        num_threads: intra-op threads (default: ONNX Runtime's choice, one per core).
    """

    def __init__(self, folder: str | Path, *, quantized: bool = False, num_threads: int | None = None):
        folder = Path(folder)
        if not is_onnx_folder(folder):
            raise ConfigError(f"{folder}: not an ONNX export (no {ONNX_CONFIG}); run `embforge export onnx` first")
        try:
            cfg = json.loads((folder / ONNX_CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{folder / ONNX_CONFIG}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{folder / ONNX_CONFIG}: format_version {cfg.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        model_file = folder / ONNX_FILES["int8" if quantized else "fp32"]
        if not model_file.is_file():
            hint = " (export with --int8)" if quantized else ""
            raise ConfigError(f"{model_file}: missing{hint}")
        ort = require("onnxruntime")
        tokenizers = require("tokenizers")

        self.folder = folder
        self.quantized = quantized
        self.hidden_size = int(cfg["hidden_size"])
        self.max_seq_len = int(cfg["max_seq_len"])
        self.normalize = bool(cfg["normalize"])
        self.do_lower_case = bool(cfg.get("do_lower_case", False))
        self.prompts: dict[str, str] = dict(cfg.get("prompts") or {})
        self.default_prompt_name: str | None = cfg.get("default_prompt_name")
        self.pad_token_id = int(cfg.get("pad_token_id") or 0)
        self.source = cfg.get("source")

        # two copies: one truncates exactly like the model's tokenizer, one counts full lengths
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # padding is done per batch, below
        self.tokenizer.enable_truncation(self.max_seq_len)
        self._counter = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._counter.no_padding()
        self._counter.no_truncation()
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self._input_names = [i.name for i in self.session.get_inputs()]

    @classmethod
    def load(cls, name_or_path: str | Path, **kwargs) -> OnnxEmbedder:
        """Same as the constructor; mirrors :meth:`Embedder.load`."""
        return cls(name_or_path, **kwargs)

    # ------------------------------------------------------------------ tokenisation
    def _prompted(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        prefix = resolve_prompt(self.prompts, self.default_prompt_name, prompt_name)
        texts = [prefix + t for t in texts]
        return [t.lower() for t in texts] if self.do_lower_case else texts

    def token_ids(
        self, texts: Sequence[str], *, prompt_name: str | None = None, truncate: bool = True
    ) -> list[list[int]]:
        """Prompted token ids of each text, special tokens included; truncated to ``max_seq_len`` unless told not to."""
        tokenizer = self.tokenizer if truncate else self._counter
        return [e.ids for e in tokenizer.encode_batch(self._prompted(texts, prompt_name))]

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None) -> dict[str, np.ndarray]:
        """Prompted, truncated, right-padded batch: ``input_ids`` and ``attention_mask``, (B, T) int64."""
        return pad_batch(self.token_ids(texts, prompt_name=prompt_name), self.pad_token_id)

    # ------------------------------------------------------------------ inference
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) ids and mask -> (B, D) float32 embeddings (normalised if the model normalises)."""
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        return self.session.run(None, {k: feeds[k] for k in self._input_names})[0]

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 32,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts, batches of similar length. Same arguments and result as :meth:`Embedder.encode`."""
        items, single = encode_items(texts, batch_size)
        dim = check_dimensions(dimensions, self.hidden_size)
        out = np.empty((len(items), dim), dtype=np.float32)
        if items:
            ids = self.token_ids(items, prompt_name=prompt_name)
            batches = length_batches(ids, batch_size)
            show = show_progress if show_progress is not None else len(batches) >= PROGRESS_MIN_BATCHES
            bar = _progress(len(batches), show)
            for idx in batches:
                batch = pad_batch([ids[i] for i in idx], self.pad_token_id)
                out[idx] = truncate_dimensions(self.forward(**batch), dim, self.normalize)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return out[0] if single else out

    def encode_queries(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``query`` prompt when the model defines one."""
        kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(texts, **kwargs)

    def encode_documents(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``document`` prompt when the model defines one."""
        kwargs.setdefault("prompt_name", "document" if "document" in self.prompts else None)
        return self.encode(texts, **kwargs)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad token id lists -> ``input_ids`` (B, T) and ``attention_mask`` (B, T), int64."""
    T = max(len(r) for r in rows)
    input_ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _progress(total: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm  # only when a bar is shown: keeps start-up light

    return tqdm(total=total, desc="encode", unit="batch", disable=os.environ.get("TQDM_DISABLE") == "1")
