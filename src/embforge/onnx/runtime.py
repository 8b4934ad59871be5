"""Inference on an exported ONNX model with ONNX Runtime: no torch, no transformers.

An exported folder (``embforge export onnx MODEL OUT``) holds ``model.onnx`` (the whole
:meth:`Embedder.forward`: backbone, pooling, normalisation; inputs ``input_ids``,
``attention_mask`` and ``pooling_mask``), optionally ``model_int8.onnx`` (dynamic int8
quantisation), the tokenizer as ``tokenizer.json`` and ``embforge_onnx.json`` (the
tokeniser's settings, prompts, instruction template, normalisation). Texts are tokenised by
the same :class:`~embforge.modeling.tokenization.TextEncoder` as everywhere else, so
instruction prompts are masked out of pooling exactly as in PyTorch. :class:`OnnxEmbedder`
mirrors the inference API of :class:`~embforge.models.embedder.Embedder`::

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

from embforge.errors import ConfigError, InputError
from embforge.modeling.tokenization import Row, TextEncoder, TokenizerSettings
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.matryoshka import check_dimensions, truncate_dimensions
from embforge.models.prompts import resolve_prompt
from embforge.optional import require

ONNX_CONFIG = "embforge_onnx.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
FORMAT_VERSION = 2  # 2: the graph takes the pooling mask; the tokeniser's settings are saved


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
                f"{folder / ONNX_CONFIG}: format_version {cfg.get('format_version')!r}, expected {FORMAT_VERSION}; "
                "export the model again with this embforge (`embforge export onnx`)"
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
        self.normalize = bool(cfg["normalize"])
        self.prompts: dict[str, str] = dict(cfg.get("prompts") or {})
        self.default_prompt_name: str | None = cfg.get("default_prompt_name")
        self.instruction_template: str | None = cfg.get("instruction_template")
        self.source = cfg.get("source")
        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.text_encoder = TextEncoder(tokenizer, TokenizerSettings(**cfg["tokenization"]))
        self.max_seq_len = self.text_encoder.settings.max_len
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

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
    def _rows(self, texts: Sequence[str], prompt_name: str | None, prompt: str | None) -> list[Row]:
        if prompt is not None and prompt_name is not None:
            raise InputError("give prompt_name or prompt, not both")
        if prompt is None:
            prompt = resolve_prompt(self.prompts, self.default_prompt_name, prompt_name)
        return self.text_encoder.encode(list(texts), [prompt] * len(texts))

    def tokenize(
        self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None
    ) -> dict[str, np.ndarray]:
        """Prompted, truncated, padded batch: ``input_ids``, ``attention_mask``, ``pooling_mask``, (B, T) int64."""
        batch = self.text_encoder.pad(self._rows(texts, prompt_name, prompt))
        return {k: np.asarray(v) for k, v in batch.items()}

    def instruction_prompt(self, instruction: str) -> str | None:
        """The query prompt for a task instruction, or None if this model takes no instructions."""
        if self.instruction_template is None:
            return None
        return self.instruction_template.format(instruction=instruction)

    # ------------------------------------------------------------------ inference
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pooling_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, T) ids and masks -> (B, D) float32 embeddings (normalised if the model normalises).

        ``pooling_mask`` None pools every real token (no instruction masking).
        """
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        feeds["pooling_mask"] = feeds["attention_mask"] if pooling_mask is None else np.asarray(pooling_mask, np.int64)
        return self.session.run(None, {k: feeds[k] for k in self._input_names})[0]

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts, batches of similar length. Same arguments and result as :meth:`Embedder.encode`."""
        items, single = encode_items(texts, batch_size)
        dim = check_dimensions(dimensions, self.hidden_size)
        out = np.empty((len(items), dim), dtype=np.float32)
        if items:
            rows = self._rows(items, prompt_name, prompt)
            batches = length_batches([r.ids for r in rows], batch_size)
            show = show_progress if show_progress is not None else len(batches) >= PROGRESS_MIN_BATCHES
            bar = _progress(len(batches), show)
            for idx in batches:
                batch = self.text_encoder.pad([rows[i] for i in idx])
                out[idx] = truncate_dimensions(
                    self.forward(**{k: np.asarray(v) for k, v in batch.items()}), dim, self.normalize
                )
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return out[0] if single else out

    def encode_queries(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``query`` prompt when the model defines one."""
        if "prompt" not in kwargs:
            kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(texts, **kwargs)

    def encode_documents(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``document`` prompt when the model defines one."""
        if "prompt" not in kwargs:
            kwargs.setdefault("prompt_name", "document" if "document" in self.prompts else None)
        return self.encode(texts, **kwargs)


def _progress(total: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm  # only when a bar is shown: keeps start-up light

    return tqdm(total=total, desc="encode", unit="batch", disable=os.environ.get("TQDM_DISABLE") == "1")
