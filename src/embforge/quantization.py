"""Quantised embeddings for storage, and search over them with float rescoring (numpy only).

- ``int8`` / ``uint8``: each dimension is mapped linearly from its calibration range
  ``[min, max]`` (:func:`calibration_ranges` on a sample of the corpus) onto 256 levels: 4x smaller.
- ``binary`` / ``ubinary``: the sign of each dimension, 8 per byte (``np.packbits``): 32x
  smaller; ``binary`` stores the packed bytes offset by -128 as int8, ``ubinary`` as uint8.

:func:`search` retrieves ``top_k x rescore_multiplier`` candidates with the cheap quantised
scores (Hamming distance for binary; for int8 the float query against de-quantised rows,
which is already the final score), then rescores them
with the float query against the de-quantised candidates, which recovers most of the
float ranking at a fraction of the memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from embforge.errors import InputError

Precision = Literal["int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("int8", "uint8", "binary", "ubinary")
_CORPUS_BLOCK = 65536  # corpus rows de-quantised at once while scoring


def calibration_ranges(emb: np.ndarray) -> np.ndarray:
    """Per-dimension ``[min; max]`` of a calibration sample. (N, D) -> (2, D) float32."""
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise InputError(f"calibration embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    return np.stack([emb.min(axis=0), emb.max(axis=0)])


CALIBRATION_FILE = "calibration.json"  # in a model folder: what int8/uint8 output of that model uses
_CALIBRATION_FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    """int8/uint8 calibration ranges of one model, per output width (Matryoshka ``dimensions``).

    A width's ranges are those of the model's embeddings at that width (truncated by the model's
    rule and re-normalised), so ``quantize_embeddings(encode(t, dimensions=d), p, c.ranges_for(d))``
    is the model's int8/uint8 output at width ``d``. Written by ``embforge calibrate``.
    """

    ranges: dict[int, np.ndarray]  # width -> (2, width) float32: min and max per dimension
    sample_size: int
    prompt_name: str | None = None  # the prompt the sample was embedded with

    def ranges_for(self, dimensions: int) -> np.ndarray:
        if dimensions not in self.ranges:
            raise InputError(
                f"no int8/uint8 calibration for {dimensions} dimensions (calibrated: {sorted(self.ranges)}); "
                f"run `embforge calibrate MODEL --dimensions {dimensions} ...`"
            )
        return self.ranges[dimensions]

    def to_json(self) -> str:
        body = {
            "format": _CALIBRATION_FORMAT,
            "sample_size": self.sample_size,
            "prompt_name": self.prompt_name,
            "ranges": {str(d): r.tolist() for d, r in sorted(self.ranges.items())},
        }
        return json.dumps(body) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a model folder -> ``folder/calibration.json``), atomically."""
        from embforge.atomic import atomic_write

        path = Path(path)
        target = path / CALIBRATION_FILE if path.is_dir() else path
        text = self.to_json()
        return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a file written by :meth:`save` (``path``: the file or the model folder holding it)."""
        path = Path(path)
        file = path / CALIBRATION_FILE if path.is_dir() else path
        try:
            body = json.loads(file.read_text(encoding="utf-8"))
            if body.get("format") != _CALIBRATION_FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {_CALIBRATION_FORMAT}")
            ranges = {}
            for width, pair in body["ranges"].items():
                r = np.asarray(pair, dtype=np.float32)
                if r.shape != (2, int(width)) or not np.all(np.isfinite(r)) or np.any(r[0] > r[1]):
                    raise ValueError(f"ranges[{width!r}] must be finite [min, max] rows of {width} values")
                ranges[int(width)] = r
            if not ranges:
                raise ValueError("no ranges")
            return cls(ranges, int(body["sample_size"]), body.get("prompt_name"))
        except FileNotFoundError:
            raise InputError(f"{file}: no calibration file (write one with `embforge calibrate`)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{file}: not a calibration file ({exc})") from None

    @classmethod
    def find(cls, folder: str | Path) -> Calibration | None:
        """The calibration saved in a model folder, or None when it has none."""
        file = Path(folder) / CALIBRATION_FILE
        return cls.load(file) if file.is_file() else None


def calibrate(full: np.ndarray, dimensions: list[int], normalize: bool, prompt_name: str | None = None) -> Calibration:
    """Calibration from a sample's full-width embeddings (N, D), for each width in ``dimensions``."""
    from embforge.models.matryoshka import check_dimensions, truncate_dimensions

    full = np.asarray(full, dtype=np.float32)
    widths = sorted({check_dimensions(d, full.shape[1]) for d in dimensions} or {full.shape[1]})
    ranges = {d: calibration_ranges(truncate_dimensions(full, d, normalize)) for d in widths}
    return Calibration(ranges, len(full), prompt_name)


def _steps(ranges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, dim):
        raise InputError(f"ranges must have shape (2, {dim}) (min and max per dimension), got {ranges.shape}")
    low, high = ranges
    return low, np.maximum(high - low, 1e-12) / 255.0


def quantize_embeddings(emb: np.ndarray, precision: Precision, ranges: np.ndarray | None = None) -> np.ndarray:
    """Quantise float embeddings.

    Args:
        emb: (N, D) float embeddings.
        precision: ``int8``, ``uint8``, ``binary`` or ``ubinary``.
        ranges: (2, D) calibration ranges for int8/uint8 (default: those of ``emb`` itself).

    Returns:
        (N, D) int8/uint8 for ``int8``/``uint8``; (N, ceil(D / 8)) int8/uint8 for ``binary``/``ubinary``.
    """
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise InputError(f"embeddings must be a (N, D) array, got shape {emb.shape}")
    if precision in ("binary", "ubinary"):
        packed = np.packbits(emb > 0, axis=-1)  # (N, ceil(D / 8)) uint8
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if precision not in ("int8", "uint8"):
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    low, step = _steps(calibration_ranges(emb) if ranges is None else ranges, emb.shape[1])
    levels = np.clip(np.round((emb - low) / step), 0, 255)  # (N, D) in [0, 255]
    return (levels - 128).astype(np.int8) if precision == "int8" else levels.astype(np.uint8)


def dequantize_embeddings(
    q: np.ndarray, precision: Precision, ranges: np.ndarray | None = None, dim: int | None = None
) -> np.ndarray:
    """Approximate float embeddings back: int8/uint8 -> values in the calibration range; binary -> +-1.

    Args:
        q: output of :func:`quantize_embeddings`.
        precision: the precision it was quantised with.
        ranges: the (2, D) calibration ranges (int8/uint8 only).
        dim: the original width for binary inputs (default: 8 x bytes).
    """
    if precision in ("binary", "ubinary"):
        packed = (q.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else q
        bits = np.unpackbits(packed, axis=-1, count=dim)  # (N, D) in {0, 1}
        return bits.astype(np.float32) * 2 - 1
    if precision not in ("int8", "uint8"):
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if ranges is None:
        raise InputError("de-quantising int8/uint8 needs the calibration ranges used to quantise")
    low, step = _steps(ranges, q.shape[1])
    levels = q.astype(np.float32) + (128 if precision == "int8" else 0)
    return low + levels * step


def _coarse_scores(queries: np.ndarray, corpus_q: np.ndarray, precision: Precision, ranges) -> np.ndarray:
    """Cheap similarity of float queries (Q, D) to quantised corpus rows -> (Q, N), higher is better."""
    if precision in ("binary", "ubinary"):
        qb = np.packbits(queries > 0, axis=-1)  # (Q, B)
        cb = (corpus_q.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else corpus_q
        xor = qb[:, None, :] ^ cb[None, :, :]  # (Q, N, B)
        return -np.unpackbits(xor, axis=-1).sum(axis=-1, dtype=np.int32)  # minus Hamming distance
    # int8/uint8: the float query against de-quantised rows, a block of rows at a time
    out = np.empty((len(queries), len(corpus_q)), dtype=np.float32)
    for start in range(0, len(corpus_q), _CORPUS_BLOCK):
        block = dequantize_embeddings(corpus_q[start : start + _CORPUS_BLOCK], precision, ranges)  # (b, D)
        out[:, start : start + len(block)] = queries @ block.T
    return out


def search(
    queries: np.ndarray,
    corpus_q: np.ndarray,
    precision: Precision,
    *,
    top_k: int = 10,
    ranges: np.ndarray | None = None,
    rescore_multiplier: int = 4,
    query_chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k search of float queries over a quantised corpus, with float rescoring.

    Args:
        queries: (Q, D) float query embeddings (not quantised: they are used for rescoring).
        corpus_q: quantised corpus from :func:`quantize_embeddings`.
        precision: the corpus precision.
        top_k: results per query.
        ranges: calibration ranges (int8/uint8).
        rescore_multiplier: candidates per query = ``top_k x rescore_multiplier`` (1: no rescoring gain).
        query_chunk: queries scored at once (memory is ``query_chunk x N``).

    Returns:
        (scores, indices), each (Q, k) with k = min(top_k, N), best first; scores are float
        query . de-quantised document.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if precision in ("int8", "uint8") and ranges is None:
        raise InputError("searching an int8/uint8 corpus needs its calibration ranges")
    n = len(corpus_q)
    k = min(top_k, n)
    n_cand = min(max(k * rescore_multiplier, k), n)
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_chunk):
        q = queries[start : start + query_chunk]  # (C, D)
        coarse = _coarse_scores(q, corpus_q, precision, ranges)  # (C, N)
        cand = np.argpartition(-coarse, n_cand - 1, axis=1)[:, :n_cand]  # (C, n_cand) unordered
        for row, (query, ids) in enumerate(zip(q, cand)):
            docs = dequantize_embeddings(corpus_q[ids], precision, ranges, dim=q.shape[1])  # (n_cand, D)
            fine = docs @ query  # (n_cand,)
            best = np.argsort(-fine, kind="stable")[:k]
            scores[start + row] = fine[best]
            indices[start + row] = ids[best]
    return scores, indices


def hamming_distances(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Hamming distances between sign-packed codes (``ubinary`` output). (Q, B), (N, B) uint8 -> (Q, N) int32.

    XOR then popcount, on 64-bit words when the code length allows (8x fewer elements);
    memory is Q x N x words: pass a few hundred queries at a time for large corpora.
    """
    queries, corpus = np.asarray(queries), np.asarray(corpus)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise InputError(f"codes must be (Q, B) and (N, B) with the same B, got {queries.shape} and {corpus.shape}")
    if queries.dtype != np.uint8 or corpus.dtype != np.uint8:
        raise InputError("Hamming distances take ubinary (uint8) codes")
    if queries.shape[1] % 8 == 0:  # whole 64-bit words
        queries = np.ascontiguousarray(queries).view(np.uint64)
        corpus = np.ascontiguousarray(corpus).view(np.uint64)
    xor = queries[:, None, :] ^ corpus[None, :, :]  # (Q, N, W)
    return np.bitwise_count(xor).sum(axis=-1, dtype=np.int32)


def hamming_search(
    queries: np.ndarray, corpus: np.ndarray, top_k: int = 10, query_chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by Hamming distance between sign-packed codes (no float rescoring).

    Args:
        queries: (Q, B) ``ubinary`` codes (:func:`quantize_embeddings` of the query embeddings).
        corpus: (N, B) ``ubinary`` codes.
        top_k: results per query.
        query_chunk: queries compared at once.

    Returns:
        (distances, indices), each (Q, k) with k = min(top_k, N), nearest first; equal
        distances keep corpus order.
    """
    k = min(top_k, len(corpus))
    distances = np.empty((len(queries), k), dtype=np.int32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_chunk):
        dist = hamming_distances(queries[start : start + query_chunk], corpus)  # (C, N)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # (C, k)
        distances[start : start + len(dist)] = np.take_along_axis(dist, order, axis=1)
        indices[start : start + len(dist)] = order
    return distances, indices
