"""What the server needs from a model, and adapters for the PyTorch and ONNX Runtime embedders.

The server never looks inside a model: it tokenises through the model's own ``tokenize``
(so prompts, truncation and any extra per-token inputs stay the model's business), runs
its ``forward`` on padded batches, and truncates dimensions with the Matryoshka rule of
:mod:`embforge.models.matryoshka`. Tests plug in any object with the :class:`Backend` shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Encoded:
    """One input after tokenisation.

    Attributes:
        features: per-token model inputs, each a 1-D int64 array of the same length
            (``input_ids``, ``attention_mask`` and whatever else the model's tokenizer gives).
        num_tokens: tokens the model sees (after truncation).
        input_tokens: tokens of the whole input before truncation (>= ``num_tokens``).
    """

    features: dict[str, np.ndarray]
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

    def embed(self, batch: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Per-item features -> (B, hidden_size) float32 embeddings."""
        ...

    def describe(self) -> dict: ...


def from_token_ids(ids: Sequence[int]) -> Encoded:
    """A token-id input (the model's own ids, special tokens included) as the model's features."""
    arr = np.asarray(ids, dtype=np.int64)
    return Encoded({"input_ids": arr, "attention_mask": np.ones_like(arr)}, len(arr), len(arr))


def pad_features(rows: Sequence[dict[str, np.ndarray]], pad_id: int, side: str = "right") -> dict[str, np.ndarray]:
    """Per-item 1-D features -> padded (B, T) int64 arrays (``input_ids`` padded with ``pad_id``, others 0)."""
    T = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        arr = np.full((len(rows), T), fill, dtype=np.int64)  # (B, T)
        for i, r in enumerate(rows):
            n = len(r[key])
            if side == "left":
                arr[i, T - n :] = r[key]
            else:
                arr[i, :n] = r[key]
        out[key] = arr
    return out


class _ModelBackend:
    """Shared by both adapters: prompts, the split of a padded batch into items, the description."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self.hidden_size = int(model.hidden_size)
        self.max_seq_len = int(model.max_seq_len)
        self.normalize = bool(model.normalize)
        self.prompts = dict(model.prompts)
        self.default_prompt_name = model.default_prompt_name

    def _split(self, batch: dict[str, np.ndarray], texts: Sequence[str], prompt_name: str | None) -> list[Encoded]:
        mask = batch["attention_mask"].astype(bool)  # (B, T)
        per_token = {k: v for k, v in batch.items() if v.shape == mask.shape}
        items = []
        for i in range(len(mask)):
            feats = {k: v[i][mask[i]] for k, v in per_token.items()}
            n = int(mask[i].sum())
            items.append(Encoded(feats, n, n))
        # an input that filled the window may have been truncated: count its full length
        full = [i for i, e in enumerate(items) if e.num_tokens >= self.max_seq_len]
        if full:
            for i, count in zip(full, self._full_counts([texts[i] for i in full], prompt_name)):
                items[i].input_tokens = max(count, items[i].num_tokens)
        return items

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
        tok = embedder.tokenizer
        self.vocab_size = len(tok)
        self.pad_id = tok.pad_token_id or 0
        self.padding_side = getattr(tok, "padding_side", "right")

    def tokenize(self, texts: Sequence[str], prompt_name: str | None) -> list[Encoded]:
        batch = self.model.tokenize(list(texts), prompt_name=prompt_name)
        return self._split({k: v.cpu().numpy() for k, v in batch.items()}, texts, prompt_name)

    def _full_counts(self, texts: Sequence[str], prompt_name: str | None) -> list[int]:
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        prefix = self.prompts.get(name, "") if name else ""
        return [len(ids) for ids in self.model.tokenizer([prefix + t for t in texts])["input_ids"]]

    def embed(self, batch: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        import torch

        padded = pad_features(batch, self.pad_id, self.padding_side)
        device = self.model.device
        with torch.inference_mode(), self.model.inference_autocast():
            out = self.model(**{k: torch.from_numpy(v).to(device) for k, v in padded.items()})  # (B, D)
        return out.float().cpu().numpy()

    def describe(self) -> dict:
        return {**super().describe(), "precision": self.model.inference_precision}


class OnnxBackend(_ModelBackend):
    """An :class:`~embforge.onnx.runtime.OnnxEmbedder` (fp32 or int8)."""

    kind = "onnx"

    def __init__(self, embedder, name: str):
        super().__init__(embedder, name)
        self.vocab_size = embedder.vocab_size
        self.pad_id = embedder.pad_token_id

    def tokenize(self, texts: Sequence[str], prompt_name: str | None) -> list[Encoded]:
        return self._split(self.model.tokenize(list(texts), prompt_name=prompt_name), texts, prompt_name)

    def _full_counts(self, texts: Sequence[str], prompt_name: str | None) -> list[int]:
        return [len(ids) for ids in self.model.token_ids(texts, prompt_name=prompt_name, truncate=False)]

    def embed(self, batch: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        padded = pad_features(batch, self.pad_id)
        return self.model.forward(padded["input_ids"], padded["attention_mask"])

    def describe(self) -> dict:
        return {**super().describe(), "quantized": self.model.quantized}


def backend_for(model, name: str) -> TorchBackend | OnnxBackend:
    """Wrap an Embedder or an OnnxEmbedder."""
    from embforge.onnx.runtime import OnnxEmbedder

    return OnnxBackend(model, name) if isinstance(model, OnnxEmbedder) else TorchBackend(model, name)
