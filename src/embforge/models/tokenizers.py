"""Tokenizers that ship with packaged models (no hub access)."""

from __future__ import annotations

from pathlib import Path

from embforge.models.registry import resolve_model_path


def nomic_tokenizer(name_or_path: str | Path = "all-MiniLM-L6-v2", max_seq_len: int | None = None):
    """A local tokenizer (a packaged model's or a folder's); by default the bert-base-uncased
    WordPiece tokenizer (30,522 tokens) nomic-bert uses.

    The packaged all-MiniLM-L6-v2 carries exactly that vocabulary, so no download is
    needed; any local folder with a tokenizer works too (a backbone preset's ``model.tokenizer``).

    Args:
        max_seq_len: sets ``model_max_length`` (truncation length), e.g. 2048.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), local_files_only=True)
    if max_seq_len:
        tokenizer.model_max_length = max_seq_len
    return tokenizer
