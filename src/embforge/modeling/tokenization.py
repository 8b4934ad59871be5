"""The one tokeniser and padder of every path: prompt + text -> token ids, attention and pooling masks.

``Embedder``, the training collate, the ONNX Runtime embedder, the server and a saved
folder's sentence-transformers / transformers classes all call :class:`TextEncoder`, so a
text becomes the same tokens everywhere. It works on a ``tokenizers.Tokenizer`` (the Rust
tokenizer behind every transformers fast tokenizer, ``tokenizer.backend_tokenizer``) and
imports nothing beyond the standard library: the ONNX path uses it without torch.

What it does, in order:

1. lower-case prompt and text when the model says so (some sentence-transformers models);
2. tokenise ``prompt + text`` with special tokens, truncated to ``max_len`` (one less with
   ``add_eos``, which then appends EOS unless the text already ends with it);
3. count the leading *instruction* tokens when the prompt is not pooled (``pool_prompt``
   false). The rule: the prompt is tokenised inside the full string, and a leading token
   belongs to the instruction iff all of its characters lie inside the prompt (offset end
   <= len(prompt)); leading special tokens (BOS/CLS, offsets (0, 0)) count as instruction
   when there is a prompt. A token straddling the boundary (e.g. "▁how" eating the prompt's
   trailing space) is content;
4. pad on the model's side (left or right) with its pad id; the pooling mask keeps real
   tokens whose rank among the row's real tokens is at least the row's instruction length,
   so it is right for either side.

Batches come out as ``(B, T)`` int64 buffers (:class:`TokenBatch`): ``torch`` tensors via
:meth:`TokenBatch.to_torch`, numpy arrays via ``numpy.asarray`` on each field (zero-copy).
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass

from .head import PADDING_SIDES, HeadSpec


@dataclass(frozen=True)
class TokenizerSettings:
    """Everything besides the vocabulary that decides a text's tokens and masks (saved with every model)."""

    max_len: int  # total length cap, EOS included
    pad_id: int = 0
    padding_side: str = "right"  # "left" or "right"
    truncation_side: str = "right"
    add_eos: bool = False  # append EOS (decoder embedding models pool over it)
    eos_id: int | None = None
    pool_prompt: bool = True  # false: the prompt is an instruction, attended to but not pooled
    lower_case: bool = False

    def __post_init__(self):
        if self.padding_side not in PADDING_SIDES or self.truncation_side not in PADDING_SIDES:
            raise ValueError(f"padding_side and truncation_side must be 'left' or 'right', got {self}")
        if self.add_eos and self.eos_id is None:
            raise ValueError("add_eos is set but the tokenizer has no EOS token")
        if self.max_len < (2 if self.add_eos else 1):
            raise ValueError(f"max_len must leave room for a token, got {self.max_len}")

    @classmethod
    def for_head(cls, head: HeadSpec, *, pad_id: int, eos_id: int | None, truncation_side: str = "right"):
        """A resolved head's tokenisation (its window, EOS, padding side, prompt pooling, case) with the
        tokenizer's pad and EOS ids (:func:`token_ids`)."""
        unresolved = [k for k in ("max_seq_len", "add_eos", "padding_side") if getattr(head, k) is None]
        if unresolved:
            raise ValueError(f"the head spec leaves {unresolved} to the model: resolve it (Embedder does) first")
        return cls(
            max_len=int(head.max_seq_len),
            pad_id=pad_id,
            padding_side=head.padding_side,
            truncation_side=truncation_side,
            add_eos=bool(head.add_eos),
            eos_id=eos_id,
            pool_prompt=head.pool_prompt,
            lower_case=head.do_lower_case,
        )


def token_ids(tokenizer) -> dict:
    """What :meth:`TokenizerSettings.for_head` takes from a transformers tokenizer besides the head."""
    return {
        "pad_id": tokenizer.pad_token_id or 0,
        "eos_id": tokenizer.eos_token_id,
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
    }


@dataclass
class Row:
    """One tokenised text: its ids, how many leading tokens are left out of pooling, whether it was cut."""

    ids: list[int]
    excluded: int = 0
    truncated: bool = False  # the text had more tokens than the window: some were cut


class TokenBatch:
    """A padded batch: ``input_ids``, ``attention_mask`` and ``pooling_mask``, each a (B, T) int64 buffer."""

    FIELDS = ("input_ids", "attention_mask", "pooling_mask")

    def __init__(self, rows: Sequence[Row], settings: TokenizerSettings):
        B, T = len(rows), max((len(r.ids) for r in rows), default=0)
        self.shape = (B, T)
        ids, attention, pooling = (array.array("q", bytes(8 * B * T)) for _ in self.FIELDS)
        if settings.pad_id:
            ids[:] = array.array("q", [settings.pad_id]) * (B * T)
        for i, row in enumerate(rows):
            n = len(row.ids)
            start = i * T + (T - n if settings.padding_side == "left" else 0)
            ids[start : start + n] = array.array("q", row.ids)
            attention[start : start + n] = array.array("q", [1]) * n
            kept = max(n - row.excluded, 0)  # the row's real tokens from rank ``excluded`` on
            pooling[start + n - kept : start + n] = array.array("q", [1]) * kept
        self._buffers = dict(zip(self.FIELDS, (ids, attention, pooling)))

    def __getitem__(self, name: str) -> memoryview:
        """A field as a (B, T) memoryview of int64 (``numpy.asarray`` of it is zero-copy)."""
        buffer = memoryview(self._buffers[name])
        return buffer.cast("B").cast("q", self.shape) if all(self.shape) else buffer

    def items(self):
        return ((name, self[name]) for name in self.FIELDS)

    def to_torch(self, device=None) -> dict:
        """The fields as (B, T) ``torch.long`` tensors (on ``device`` if given)."""
        import torch

        out = {}
        for name in self.FIELDS:
            t = torch.frombuffer(self._buffers[name], dtype=torch.int64) if all(self.shape) else torch.zeros(0)
            t = t.view(self.shape).long()
            out[name] = t.to(device) if device is not None else t
        return out


class TextEncoder:
    """Prompt + text -> :class:`Row` and padded :class:`TokenBatch` (see the module docstring).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, or a transformers fast tokenizer (its backend is used).
        settings: the model's :class:`TokenizerSettings`.

    The tokenizer is copied and configured once (truncation on, padding off), so calls never
    change shared state: one encoder can serve several threads.
    """

    def __init__(self, tokenizer, settings: TokenizerSettings):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.settings = settings
        self.source = tokenizer  # what it was built from
        self._backend = backend
        self._truncating = self._copy(backend)
        limit = settings.max_len - (1 if settings.add_eos else 0)
        self._truncating.enable_truncation(limit, direction=settings.truncation_side)
        self._counting = None  # built on first use: untruncated lengths (the server's usage counts)

    @staticmethod
    def _copy(backend):
        copy = type(backend).from_str(backend.to_str())
        copy.no_padding()
        copy.no_truncation()
        copy.encode_special_tokens = backend.encode_special_tokens  # not part of the serialised state
        return copy

    def _full_texts(self, texts: Sequence[str], prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        if len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts")
        if self.settings.lower_case:
            prompts = [p.lower() for p in prompts]
            texts = [t.lower() for t in texts]
        return [p + t for p, t in zip(prompts, texts)], list(prompts)

    def encode(self, texts: Sequence[str], prompts: Sequence[str]) -> list[Row]:
        """One :class:`Row` per text (``prompts``: one per text, "" for none)."""
        full, prompts = self._full_texts(texts, prompts)
        s = self.settings
        encodings = self._truncating.encode_batch(full, add_special_tokens=True)
        rows = []
        for prompt, enc in zip(prompts, encodings):
            ids = list(enc.ids)
            if s.add_eos and (not ids or ids[-1] != s.eos_id):
                ids.append(s.eos_id)
            excluded = 0
            if prompt and not s.pool_prompt:
                offsets = enc.offsets
                while excluded < len(offsets) and offsets[excluded][1] <= len(prompt):
                    excluded += 1
            rows.append(Row(ids, excluded, bool(enc.overflowing)))
        return rows

    def count_tokens(self, texts: Sequence[str], prompts: Sequence[str]) -> list[int]:
        """Tokens of each whole input before truncation (special tokens and EOS included)."""
        if self._counting is None:
            self._counting = self._copy(self._backend)
        full, _ = self._full_texts(texts, prompts)
        extra = 1 if self.settings.add_eos else 0
        out = []
        for enc in self._counting.encode_batch_fast(full, add_special_tokens=True):
            ids = enc.ids
            out.append(len(ids) + (extra if not ids or ids[-1] != self.settings.eos_id else 0))
        return out

    def pad(self, rows: Sequence[Row]) -> TokenBatch:
        """Pad rows into one batch on the model's padding side."""
        return TokenBatch(rows, self.settings)

    def __call__(self, texts: Sequence[str], prompts: Sequence[str]) -> TokenBatch:
        """:meth:`encode` then :meth:`pad`."""
        return self.pad(self.encode(texts, prompts))
