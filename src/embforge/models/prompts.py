"""Prompt lookup shared by every embedder (PyTorch and ONNX Runtime); imports no torch."""

from __future__ import annotations

from embforge.config import did_you_mean
from embforge.errors import InputError


def resolve_prompt(prompts: dict[str, str], default_prompt_name: str | None, prompt_name: str | None) -> str:
    """The text of ``prompt_name`` (default: ``default_prompt_name``), "" for none.

    Raises:
        InputError: an unknown prompt name (with a did-you-mean and the model's names).
    """
    name = prompt_name if prompt_name is not None else default_prompt_name
    if name is None:
        return ""
    if name not in prompts:
        raise InputError(
            f"unknown prompt_name {name!r}" + did_you_mean(name, prompts) + f"; this model has {sorted(prompts)}"
        )
    return prompts[name]
