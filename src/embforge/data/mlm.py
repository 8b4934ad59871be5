"""Masked-language-model data: documents → token chunks of fixed length → masked batches.

Texts are tokenised without special tokens, concatenated (a ``[SEP]`` after each
document) and cut into chunks of ``chunk_len`` tokens: ``[CLS] body [SEP]`` with no
padding, so no compute goes to padding (paper §4.1 packs into 2,048-token chunks).
Masking follows BERT with the paper's rate (30 %, MosaicBERT): of the chosen positions,
80 % become ``[MASK]``, 10 % a random non-special token, 10 % stay unchanged. Special
tokens are never chosen. Every draw comes from the ``torch.Generator`` passed in, so a
seed fixes the masks.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from embforge.data.io import read_texts, require_file
from embforge.errors import DataError

TextFormat = Literal["wikitext", "text", "jsonl"]
IGNORE = -100  # label of positions that are not predicted (cross-entropy's ignore_index)
MASK_SPLIT = (0.8, 0.1, 0.1)  # [MASK] / random token / unchanged, BERT (Devlin et al. 2019 §3.1)

_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = " starts an article; " = = Section = = " does not
_WIKITEXT_DETOK = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]"))


def expand_files(patterns: list[str], root: Path) -> list[Path]:
    """Paths (globs allowed) relative to ``root``, in order; DataError if one matches nothing."""
    files: list[Path] = []
    for pattern in patterns:
        full = Path(pattern) if Path(pattern).is_absolute() else root / pattern
        matched = sorted(Path(p) for p in glob.glob(str(full))) if glob.has_magic(str(full)) else [full]
        if not matched:
            raise DataError(f"no file matches {pattern!r} under {root}")
        files += [require_file(p, "MLM text file") for p in matched]
    return files


def read_documents(path: Path, fmt: TextFormat, field: str = "text") -> list[str]:
    """Documents of one file.

    Args:
        fmt: ``wikitext`` (WikiText tokens files: one document per article, ``@-@`` style
            escapes undone, ``<unk>`` -> ``[UNK]``), ``text`` (one document per non-empty
            line), ``jsonl`` (``field`` of each line).
    """
    if fmt == "jsonl":
        return read_texts(path, field=field)
    lines = require_file(path, "MLM text file").read_text(encoding="utf-8").splitlines()
    if fmt == "text":
        return [line.strip() for line in lines if line.strip()]
    docs: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) or not docs:
            docs.append([])
        if line.strip():
            text = line.strip()
            for old, new in _WIKITEXT_DETOK:
                text = text.replace(old, new)
            docs[-1].append(text)
    return ["\n".join(d) for d in docs if d]


_WIKITEXT_HEADING = re.compile(r"^ (?P<level>(= )+)(?P<name>.+?)(?: =)+ $")  # " = Title = ", " = = Section = = "


def read_wikitext_sections(path: Path) -> list[tuple[str, str]]:
    """(heading, first paragraph) of every article intro and section of a WikiText file.

    The heading is the article title, or ``"Title: Section"`` for a section; the paragraph
    is de-tokenised like :func:`read_documents`. Title-body pairs of this kind are among
    Nomic Embed's weakly supervised contrastive sources (Wikipedia title-body).
    """
    lines = require_file(path, "WikiText file").read_text(encoding="utf-8").splitlines()
    pairs: list[tuple[str, str]] = []
    title = heading = None
    for line in lines:
        match = _WIKITEXT_HEADING.match(line)
        if match:
            name = match["name"].strip()
            if match["level"] == "= ":
                title = heading = name
            elif title is not None:
                heading = f"{title}: {name}"
            continue
        text = line.strip()
        if text and heading is not None:
            for old, new in _WIKITEXT_DETOK:
                text = text.replace(old, new)
            pairs.append((heading, text))
            heading = None  # the first paragraph only
    return pairs


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-back documents): the last ``fraction`` of the documents.

    Whole documents are held back, so no held-back text is ever trained on.
    """
    if not 0 < fraction < 1:
        return docs, []
    n_held = max(1, round(len(docs) * fraction))
    if n_held >= len(docs):
        raise DataError(f"cannot hold back {fraction:.0%} of {len(docs)} documents and keep some for training")
    return docs[:-n_held], docs[-n_held:]


def tokenize_documents(docs: list[str], tokenizer, batch_size: int = 256) -> list[list[int]]:
    """Token ids of each document, without special tokens (progress bar)."""
    ids: list[list[int]] = []
    for start in tqdm(range(0, len(docs), batch_size), desc="tokenize", unit="batch", disable=len(docs) < batch_size):
        batch = docs[start : start + batch_size]
        ids += tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return ids


def pack_chunks(token_ids: list[list[int]], chunk_len: int, cls_id: int, sep_id: int) -> tuple[torch.Tensor, int]:
    """Concatenate documents (``[SEP]`` after each) and cut into ``[CLS] body [SEP]`` chunks.

    Args:
        token_ids: per-document token ids without special tokens.
        chunk_len: tokens per chunk, specials included.

    Returns:
        ((N, chunk_len) int64 chunks, number of trailing tokens that did not fill a chunk).
    """
    if chunk_len < 3:
        raise DataError(f"chunk_len must be >= 3, got {chunk_len}")
    body = chunk_len - 2
    stream = torch.tensor([t for doc in token_ids for t in (*doc, sep_id)], dtype=torch.long)  # (S,)
    n = stream.numel() // body
    chunks = torch.empty(n, chunk_len, dtype=torch.long)
    chunks[:, 0], chunks[:, -1] = cls_id, sep_id
    chunks[:, 1:-1] = stream[: n * body].view(n, body)  # (N, body)
    return chunks, stream.numel() - n * body


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_prob: float,
    mask_token_id: int,
    special_ids: list[int],
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of a batch.

    Args:
        input_ids: (B, T) token ids.
        mask_prob: share of non-special positions that are predicted (0.30 in the paper).
        special_ids: ids never chosen nor drawn as random replacements ([CLS], [SEP], [PAD], ...).
        vocab_size: the tokenizer's vocabulary size (random replacements are drawn below it).
        generator: the source of every random draw (CPU).

    Returns:
        (masked inputs (B, T), labels (B, T): the original id where chosen, else -100).
    """
    if not 0 < mask_prob < 1:
        raise DataError(f"mask_prob must be in (0, 1), got {mask_prob}")
    ids = input_ids.cpu()
    specials = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~torch.isin(ids, specials)  # (B, T)
    how = torch.rand(ids.shape, generator=generator)  # (B, T): which of the three corruptions
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[specials[specials < vocab_size]] = False
    candidates = allowed.nonzero().squeeze(1)  # (V',) non-special ids
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]  # (B, T)
    masked = ids.clone()
    masked[chosen & (how < MASK_SPLIT[0])] = mask_token_id
    use_random = chosen & (how >= MASK_SPLIT[0]) & (how < MASK_SPLIT[0] + MASK_SPLIT[1])
    masked[use_random] = random_ids[use_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return masked.to(input_ids.device), labels.to(input_ids.device)
