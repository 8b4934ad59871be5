"""An on-disk cache of corpus embeddings, so a rerun with the same teacher and corpus re-uses them.

The key hashes the teacher's identity (its folder and the size and modification time of
its weight files, or its class name), the prompt, and every text in order. Files are
written atomically; a corrupt or mismatching file is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from embforge.data.io import save_npy
from embforge.modeling.head import head_of
from embforge.vectors import l2_normalise


def weights_digest(module: Any) -> str:
    """A digest of every tensor of a torch module (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def teacher_identity(teacher: Any) -> str:
    """A string that changes whenever the teacher's weights, settings or inference precision change.

    An embforge Embedder (or any torch module) is identified by a digest of its tensors and its
    head settings; another encoder by its ``name_or_path`` and the size and modification time
    of its weight files.
    """
    name = str(getattr(teacher, "name_or_path", "") or type(teacher).__qualname__)
    folder = Path(name)
    head = head_of(teacher)
    max_len = head.max_seq_len if head is not None else getattr(teacher, "max_seq_len", "")
    parts = [name, str(max_len), str(getattr(teacher, "pooling", ""))]
    precision = getattr(teacher, "inference_precision", None)  # bf16 and fp32 embeddings differ slightly
    if precision is not None:
        parts.append(precision)
    if head is not None:
        parts.append(repr(sorted(head.to_dict().items())))
    if callable(getattr(teacher, "state_dict", None)):
        parts.append(weights_digest(teacher))
    elif folder.is_dir():
        for f in sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("*.bin")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(teacher: Any, texts: list[str], prompt_name: str | None) -> str:
    h = hashlib.sha256()
    h.update(teacher_identity(teacher).encode())
    h.update(f"|prompt={prompt_name}|n={len(texts)}|".encode())
    for t in texts:
        h.update(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest())
    return h.hexdigest()[:32]


def _cache_path(cache_dir, teacher: Any, texts: list[str], prompt_name: str | None) -> Path | None:
    return Path(cache_dir) / f"emb-{cache_key(teacher, texts, prompt_name)}.npy" if cache_dir else None


def load_cached(cache_dir, teacher: Any, texts: list[str], prompt_name: str | None) -> np.ndarray | None:
    """The cached embeddings of ``texts``, or None (missing, unreadable or the wrong shape)."""
    path = _cache_path(cache_dir, teacher, texts, prompt_name)
    if path is None or not path.is_file():
        return None
    try:
        emb = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None  # unreadable: the caller recomputes and overwrites
    return np.asarray(emb, dtype=np.float32) if emb.shape[0] == len(texts) else None


def store_cached(cache_dir, teacher: Any, texts: list[str], prompt_name: str | None, emb: np.ndarray) -> None:
    path = _cache_path(cache_dir, teacher, texts, prompt_name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy(path, emb)


def encode_normalised(teacher: Any, texts: list[str], prompt_name: str | None, batch_size: int) -> np.ndarray:
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if prompt_name is not None:
        kwargs["prompt_name"] = prompt_name
    return l2_normalise(np.asarray(teacher.encode(texts, **kwargs), dtype=np.float32).reshape(len(texts), -1))


def encode_cached(
    teacher: Any,
    texts: list[str],
    *,
    cache_dir: str | Path | None,
    prompt_name: str | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, bool]:
    """Embeddings of ``texts`` (float32, L2-normalised) and whether they came from the cache."""
    cached = load_cached(cache_dir, teacher, texts, prompt_name)
    if cached is not None:
        return cached, True
    emb = encode_normalised(teacher, texts, prompt_name, batch_size)
    store_cached(cache_dir, teacher, texts, prompt_name, emb)
    return emb, False
