"""Row-wise vector arithmetic in numpy, below every package that handles finished embeddings.

``data/`` (mining, filtering, the embedding cache), ``eval/`` (metrics, search) and
``models/matryoshka`` all normalise numpy embeddings; they import it from here so that
none of them imports another for it.
"""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32.

    Args:
        x: (N, D) array (any float or int dtype).

    Returns:
        (N, D) float32 array.
    """
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
