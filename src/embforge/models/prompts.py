"""Prompt lookup shared by every embedder (PyTorch and ONNX Runtime) and the server; imports no torch."""

from __future__ import annotations

from embforge.config import did_you_mean
from embforge.errors import InputError
from embforge.modeling.head import HeadSpec


def resolve_prompt(head: HeadSpec, prompt_name: str | None) -> str:
    """The text of ``prompt_name`` (default: the head's ``default_prompt_name``), "" for none.

    Raises:
        InputError: an unknown prompt name (with a did-you-mean and the model's names).
    """
    try:
        return head.prompt(prompt_name)
    except LookupError:
        name, names = prompt_name, sorted(head.prompts)
        raise InputError(f"unknown prompt_name {name!r}{did_you_mean(name, names)}; this model has {names}") from None


class SideEncoding:
    """``encode_queries`` / ``encode_documents`` of every embedder (PyTorch and ONNX Runtime): ``encode``
    with the head's ``query`` / ``document`` prompt when it has one (a ``prompt`` or ``prompt_name``
    given wins)."""

    head: HeadSpec

    def encode_queries(self, texts, **kwargs):
        """:meth:`encode` with the ``query`` prompt when the model defines one."""
        return self.encode(texts, **self._side("query", kwargs))

    def encode_documents(self, texts, **kwargs):
        """:meth:`encode` with the ``document`` prompt when the model defines one."""
        return self.encode(texts, **self._side("document", kwargs))

    def _side(self, side: str, kwargs: dict) -> dict:
        if "prompt" not in kwargs:
            kwargs.setdefault("prompt_name", side if side in self.head.prompts else None)
        return kwargs
