"""Backbones, pooling and the :class:`Embedder` users hold."""
