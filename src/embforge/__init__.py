"""embforge: train, evaluate and serve generalist text-embedding models."""

from __future__ import annotations

from embforge.version import __version__

__all__ = ["Embedder", "__version__", "merge"]


def __getattr__(name: str):
    # `import embforge` stays light (no torch) until the Embedder (or merge) is asked for
    if name == "Embedder":
        from embforge.models.embedder import Embedder

        return Embedder
    if name == "merge":
        from embforge.models.merging import merge

        return merge
    raise AttributeError(f"module 'embforge' has no attribute {name!r}")
