"""Hard-negative mining with a teacher model, positive-aware (NV-Embed-v2's TopK-PercPos).

For each (query, positive) the teacher ranks a corpus; candidates are taken in rank
order, skipping the positives themselves (all of them, for multi-positive data) and
texts identical to them, and — positive-aware filtering — any candidate the teacher
scores above ``max_score_ratio`` × the positive's score, since such near-copies are most
likely unlabelled positives (false negatives). Queries are searched in chunks with FAISS
(exact inner product), so no query × corpus matrix is ever held whole.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MiningResult:
    negatives: list[list[str]]  # per query, best-ranked first
    scores: list[list[float]]  # teacher scores of the negatives
    positive_scores: list[float]
    dropped: Counter = field(default_factory=Counter)  # reason -> count


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def mine_hard_negatives(
    teacher: Any,
    queries: list[str],
    positives: list[list[str]],
    corpus: list[str],
    *,
    num_negatives: int = 3,
    skip_top: int = 0,
    search_depth: int = 50,
    max_score_ratio: float | None = 0.95,
    query_prompt_name: str | None = None,
    document_prompt_name: str | None = None,
    batch_size: int = 64,
    chunk_size: int = 1024,
) -> MiningResult:
    """Mine ``num_negatives`` hard negatives per query from ``corpus``.

    Args:
        teacher: any object with ``encode(texts, batch_size=, prompt_name=)``.
        queries: N query texts.
        positives: N lists of positive texts (usually one each).
        corpus: candidate documents (the positives may be among them).
        num_negatives: negatives kept per query.
        skip_top: ignore the first ``skip_top`` ranks (after positives are removed).
        search_depth: candidates retrieved per query.
        max_score_ratio: drop candidates scoring above this × the positive's score (None: off).
        chunk_size: queries searched at once.

    Returns:
        A :class:`MiningResult`; ``dropped`` counts every skipped candidate by reason and the
        queries left with fewer than ``num_negatives``.
    """
    import faiss

    kwargs = {"batch_size": batch_size}
    q_emb = _normalise(np.asarray(teacher.encode(queries, prompt_name=query_prompt_name, **kwargs)))
    d_emb = _normalise(np.asarray(teacher.encode(corpus, prompt_name=document_prompt_name, **kwargs)))
    first_pos = [p[0] for p in positives]
    p_emb = _normalise(np.asarray(teacher.encode(first_pos, prompt_name=document_prompt_name, **kwargs)))
    pos_scores = (q_emb * p_emb).sum(axis=1)
    index = faiss.IndexFlatIP(d_emb.shape[1])
    index.add(d_emb)
    depth = min(len(corpus), search_depth + skip_top + max(len(p) for p in positives) + 1)
    result = MiningResult([], [], pos_scores.tolist())
    for start in range(0, len(queries), chunk_size):
        scores, ids = index.search(q_emb[start : start + chunk_size], depth)  # (chunk, depth)
        for row, (s_row, i_row) in enumerate(zip(scores, ids)):
            qi = start + row
            own = set(positives[qi])
            kept_texts, kept_scores, rank = [], [], 0
            for score, idx in zip(s_row, i_row):
                if idx < 0:
                    break
                text = corpus[idx]
                if text in own:
                    result.dropped["positive or copy of it"] += 1
                    continue
                if text == queries[qi]:
                    result.dropped["identical to the query"] += 1
                    continue
                if text in kept_texts:
                    result.dropped["duplicate candidate"] += 1
                    continue
                rank += 1
                if rank <= skip_top:
                    result.dropped["inside skip_top"] += 1
                    continue
                if max_score_ratio is not None and score > max_score_ratio * pos_scores[qi]:
                    result.dropped[f"above {max_score_ratio} x positive score"] += 1
                    continue
                kept_texts.append(text)
                kept_scores.append(float(score))
                if len(kept_texts) == num_negatives:
                    break
            if len(kept_texts) < num_negatives:
                result.dropped["queries with too few negatives"] += 1
            result.negatives.append(kept_texts)
            result.scores.append(kept_scores)
    return result
