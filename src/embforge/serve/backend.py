"""What the server needs from a model, and adapters for the PyTorch and ONNX Runtime embedders.

Both adapters tokenise with the model's own :class:`~embforge.modeling.tokenization.TextEncoder`
(the one tokeniser of every path: prompts, instruction masking, EOS, truncation, padding
side) and embed padded batches of its rows with the model's forward pass, so a text gets
the same vector from the server as from ``Embedder.encode`` whatever it is batched with.
Dimensions are truncated with the Matryoshka rule of :mod:`embforge.models.matryoshka`.
Tests plug in any object with the :class:`Backend` shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from embforge.modeling.tokenization import Row
from embforge.models.prompts import resolve_prompt


@dataclass
class Encoded:
    """One input after tokenisation.

    Attributes:
        features: what the backend's ``embed`` takes per item (the model backends: a
            tokenisation :class:`~embforge.modeling.tokenization.Row`).
        num_tokens: tokens the model sees (after truncation).
        input_tokens: tokens of the whole input before truncation (>= ``num_tokens``).
    """

    features: Any
    num_tokens: int
    input_tokens: int


class Backend(Protocol):
    """The model behind the server. ``tokenize`` and ``embed`` are called from worker threads."""

    hidden_size: int
    max_seq_len: int
    vocab_size: int
    normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None

    def tokenize(self, texts: Sequence[str], prompt_name: str | None) -> list[Encoded]: ...

    def embed(self, batch: Sequence[Any]) -> np.ndarray:
        """Per-item features -> (B, hidden_size) float32 embeddings."""
        ...

    def describe(self) -> dict: ...


def from_token_ids(ids: Sequence[int]) -> Encoded:
    """A token-id input (the model's own ids, special tokens included), pooled whole."""
    row = Row([int(i) for i in ids], 0)
    return Encoded(row, len(row.ids), len(row.ids))


class _ModelBackend:
    """Shared by both adapters: tokenisation with the model's TextEncoder, padding, the description."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self.hidden_size = int(model.hidden_size)
        self.max_seq_len = int(model.max_seq_len)
        self.normalize = bool(model.normalize)
        self.prompts = dict(model.prompts)
        self.default_prompt_name = model.default_prompt_name
        self.encoder = model.text_encoder

    def tokenize(self, texts: Sequence[str], prompt_name: str | None) -> list[Encoded]:
        prompts = [resolve_prompt(self.prompts, self.default_prompt_name, prompt_name)] * len(texts)
        rows = self.encoder.encode(list(texts), prompts)
        items = [Encoded(row, len(row.ids), len(row.ids)) for row in rows]
        # a truncated input: count its full length (the usage, and the 413 without --truncate)
        full = [i for i, row in enumerate(rows) if row.truncated]
        if full:
            counts = self.encoder.count_tokens([texts[i] for i in full], [prompts[i] for i in full])
            for i, count in zip(full, counts):
                items[i].input_tokens = max(count, items[i].num_tokens)
        return items

    def embed(self, batch: Sequence[Row]) -> np.ndarray:
        return self._forward(self.encoder.pad(batch))

    def describe(self) -> dict:
        return {
            "backend": self.kind,
            "dimensions": self.hidden_size,
            "max_input_tokens": self.max_seq_len,
            "normalized": self.normalize,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "query_prompt_name": "query" if "query" in self.prompts else None,
            "document_prompt_name": "document" if "document" in self.prompts else None,
        }


class TorchBackend(_ModelBackend):
    """An :class:`~embforge.models.embedder.Embedder` (any backbone/pooling it supports)."""

    kind = "torch"

    def __init__(self, embedder, name: str):
        super().__init__(embedder, name)
        self.vocab_size = len(embedder.tokenizer)

    def _forward(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.model.inference_autocast():
            out = self.model(**batch.to_torch(self.model.device))  # (B, D)
        return out.float().cpu().numpy()

    def describe(self) -> dict:
        return {**super().describe(), "precision": self.model.inference_precision}


class OnnxBackend(_ModelBackend):
    """An :class:`~embforge.onnx.runtime.OnnxEmbedder` (fp32 or int8)."""

    kind = "onnx"

    def __init__(self, embedder, name: str):
        super().__init__(embedder, name)
        self.vocab_size = embedder.vocab_size

    def _forward(self, batch) -> np.ndarray:
        return self.model.forward(**{k: np.asarray(v) for k, v in batch.items()})

    def describe(self) -> dict:
        return {**super().describe(), "quantized": self.model.quantized}


def backend_for(model, name: str) -> TorchBackend | OnnxBackend:
    """Wrap an Embedder or an OnnxEmbedder."""
    from embforge.onnx.runtime import OnnxEmbedder

    return OnnxBackend(model, name) if isinstance(model, OnnxEmbedder) else TorchBackend(model, name)
