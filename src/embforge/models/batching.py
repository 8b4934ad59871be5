"""How ``encode`` walks its input: shared by the PyTorch and the ONNX Runtime embedders.

No torch here: the ONNX Runtime path imports it without importing torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embforge.errors import InputError

PROGRESS_MIN_BATCHES = 8  # encode shows a progress bar from this many batches on (unless told)


def encode_items(texts: str | Sequence[str], batch_size: int) -> tuple[list[str], bool]:
    """(the texts as a list, whether a single string was given).

    Raises:
        InputError: a text is not a string, or ``batch_size`` < 1.
    """
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] must be a string, got {type(text).__name__}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    return items, single


def length_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """Indices of ``ids`` in batches of similar token length, longest first: the least padding."""
    order = np.argsort([-len(x) for x in ids], kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
