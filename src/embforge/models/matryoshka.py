"""Matryoshka truncation of finished embeddings, in numpy (no torch: the ONNX and serving paths use it).

The rule is the one :meth:`Embedder.encode` applies: keep the first ``dimensions``
components of the pooled vector, then L2-normalise again if the model normalises. For a
model whose full output is already unit length this equals truncating the pooled vector.
"""

from __future__ import annotations

import numpy as np

from embforge.errors import InputError
from embforge.vectors import l2_normalise


def check_dimensions(dimensions: int | None, hidden_size: int) -> int:
    """``dimensions`` validated against the model width (``None`` -> the full width)."""
    if dimensions is None:
        return hidden_size
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= hidden_size:
        raise InputError(f"dimensions must be an integer in [1, {hidden_size}], got {dimensions!r}")
    return dimensions


def truncate_dimensions(emb: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """First ``dimensions`` columns, re-normalised when ``normalize``. (N, D) -> (N, dimensions) float32."""
    out = np.asarray(emb[:, :dimensions], dtype=np.float32)
    return l2_normalise(out) if normalize else out
