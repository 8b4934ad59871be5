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

from embforge.modeling.head import HeadSpec
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
    vocab_size: int
    head: HeadSpec  # the model's: window, normalisation, prompts, instruction template

    def tokenize(self, texts: Sequence[str], prompt_name: str | None, prompt: str | None = None) -> list[Encoded]:
        """``prompt``: a prompt text (an instruction through the template) instead of a name."""
        ...

    def embed(self, batch: Sequence[Any], adapters: Sequence[str | None] | None = None) -> np.ndarray:
        """Per-item features -> (B, hidden_size) float32 embeddings (``adapters``: each item's LoRA adapter,
        None for the base; None: every item on the base)."""
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
        self.head: HeadSpec = model.head
        self.encoder = model.text_encoder

    def tokenize(self, texts: Sequence[str], prompt_name: str | None, prompt: str | None = None) -> list[Encoded]:
        if prompt is None:
            prompt = resolve_prompt(self.head, prompt_name)
        prompts = [prompt] * len(texts)
        rows = self.encoder.encode(list(texts), prompts)
        items = [Encoded(row, len(row.ids), len(row.ids)) for row in rows]
        # a truncated input: count its full length (the usage, and the 413 without --truncate)
        full = [i for i, row in enumerate(rows) if row.truncated]
        if full:
            counts = self.encoder.count_tokens([texts[i] for i in full], [prompts[i] for i in full])
            for i, count in zip(full, counts):
                items[i].input_tokens = max(count, items[i].num_tokens)
        return items

    adapters: tuple[str, ...] = ()

    def embed(self, batch: Sequence[Row], adapters: Sequence[str | None] | None = None) -> np.ndarray:
        """Rows -> (B, D) embeddings; ``adapters``: the LoRA adapter of each row (None: the base)."""
        if adapters is not None:
            unknown = sorted({a for a in adapters if a is not None} - set(self.adapters))
            if unknown:
                raise KeyError(f"unknown adapter {unknown[0]!r}")  # the app routes only to loaded adapters
            if len(adapters) != len(batch):
                raise ValueError(f"{len(adapters)} adapters for {len(batch)} rows")
            if all(a is None for a in adapters):
                adapters = None
        return self._forward(self.encoder.pad(batch), adapters)

    def describe(self) -> dict:
        head = self.head
        return {
            "backend": self.kind,
            "dimensions": self.hidden_size,
            "max_input_tokens": head.max_seq_len,
            "normalized": head.normalize,
            "prompts": head.prompts,
            "default_prompt_name": head.default_prompt_name,
            "query_prompt_name": "query" if "query" in head.prompts else None,
            "document_prompt_name": "document" if "document" in head.prompts else None,
            "instruction_template": head.instruction_template,
            "adapters": list(self.adapters),
        }


class TorchBackend(_ModelBackend):
    """An :class:`~embforge.models.embedder.Embedder` (any backbone/pooling it supports).

    ``adapters``: LoRA adapter name -> folder, hooked onto this one copy of the base weights
    (:func:`embforge.serve.adapters.attach_adapters`). A batch may mix adapters and the base:
    the backbone runs once over all rows, each row with its adapter's LoRA deltas, and each
    row is pooled by its adapter's head.
    """

    kind = "torch"

    def __init__(self, embedder, name: str, adapters: dict | None = None):
        super().__init__(embedder, name)
        self.vocab_size = len(embedder.tokenizer)
        self.adapter_set = None
        self.heads: dict = {}
        if adapters:
            from embforge.serve.adapters import attach_adapters

            self.adapter_set, self.heads = attach_adapters(embedder, dict(adapters))
        self.adapters = tuple(self.heads)

    def _forward(self, batch, adapters: Sequence[str | None] | None = None) -> np.ndarray:
        import torch

        model = self.model
        inputs = batch.to_torch(model.device)
        with torch.inference_mode(), model.inference_autocast():
            if adapters is None:
                out = model(**inputs)  # (B, D)
            else:
                out = self._mixed(inputs, adapters)
        return out.float().cpu().numpy()

    def _mixed(self, inputs: dict, adapters: Sequence[str | None]):
        """One backbone pass over rows of several adapters; each group of rows pooled by its head."""
        import torch

        from embforge.modeling.embedding import backbone_forward, states_to_embeddings

        model = self.model
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        pooling_mask = inputs.pop("pooling_mask", None)
        pooling_mask = mask if pooling_mask is None else pooling_mask
        with self.adapter_set.rows(adapters):
            hidden = backbone_forward(model.backbone, ids, mask, bidirectional=model.head.bidirectional, **inputs)
        poolers = [model.pooler if a is None else self.heads[a] for a in adapters]
        distinct = list({id(p): p for p in poolers}.values())
        if len(distinct) == 1:
            return states_to_embeddings(distinct[0], hidden, mask, pooling_mask, head=model.head)
        out = None
        for pooler in distinct:
            rows = torch.tensor([i for i, p in enumerate(poolers) if p is pooler], device=hidden.device)
            part = states_to_embeddings(pooler, hidden[rows], mask[rows], pooling_mask[rows], head=model.head)
            out = part.new_empty(len(poolers), part.shape[1], dtype=torch.float32) if out is None else out
            out[rows] = part.float()
        return out

    def describe(self) -> dict:
        return {**super().describe(), "precision": self.model.inference_precision}


class OnnxBackend(_ModelBackend):
    """An :class:`~embforge.onnx.runtime.OnnxEmbedder` (fp32 or int8, ONNX Runtime or OpenVINO)."""

    kind = "onnx"

    def __init__(self, embedder, name: str):
        super().__init__(embedder, name)
        self.vocab_size = embedder.vocab_size

    def _forward(self, batch, adapters=None) -> np.ndarray:
        return self.model.forward(**{k: np.asarray(v) for k, v in batch.items()})

    def describe(self) -> dict:
        return {**super().describe(), "quantized": self.model.quantized, "runtime": self.model.runtime}


def backend_for(model, name: str, adapters: dict | None = None) -> TorchBackend | OnnxBackend:
    """Wrap an Embedder (with its LoRA ``adapters``: name -> folder) or an OnnxEmbedder."""
    from embforge.onnx.runtime import OnnxEmbedder

    if isinstance(model, OnnxEmbedder):
        if adapters:
            from embforge.errors import ConfigError

            raise ConfigError("LoRA adapters are served on a PyTorch model, not on an ONNX folder")
        return OnnxBackend(model, name)
    return TorchBackend(model, name, adapters)
