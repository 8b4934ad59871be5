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
