"""Evaluation metrics, pure numpy/scipy/scikit-learn (no torch, no models).

Retrieval metrics follow ``pytrec_eval`` (trec_eval) exactly as MTEB uses them:
documents are ranked by score, ties broken by document id in *descending* string order
(trec_eval's rule); nDCG uses the relevance grade as linear gain and the ideal ranking
of all judged-relevant documents; MAP@k divides by the total number of relevant
documents; MRR@k is the reciprocal rank of the first relevant document within k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, v_measure_score

from embforge.vectors import l2_normalise


def rank_top_k(scores: np.ndarray, k: int, tie_key: np.ndarray) -> np.ndarray:
    """Indices of the top ``k`` columns per row, ordered like trec_eval.

    Args:
        scores: (Q, N) similarity scores.
        k: how many to keep (capped at N).
        tie_key: (N,) integer key per document; among equal scores the larger key ranks
            first (pass the rank of each document id in ascending string order).

    Returns:
        (Q, k') column indices, best first.
    """
    Q, N = scores.shape
    k = min(k, N)
    if k < N:
        # a superset of the top k: every column whose score reaches the k-th best
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
        kth = scores[np.arange(Q)[:, None], part].min(axis=1, keepdims=True)  # (Q, 1)
    out = np.empty((Q, k), dtype=np.int64)
    for q in range(Q):
        cand = np.flatnonzero(scores[q] >= kth[q, 0]) if k < N else np.arange(N)
        # lexsort sorts by the last key first: score descending, then tie key descending
        order = np.lexsort((-tie_key[cand], -scores[q, cand].astype(np.float64)))
        out[q] = cand[order[:k]]
    return out


def retrieval_scores(
    ranked: dict[str, Sequence[str]],
    qrels: dict[str, dict[str, int]],
    k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000),
) -> dict[str, float]:
    """nDCG@k, MAP@k, Recall@k, P@k and MRR@k averaged over the judged queries.

    Args:
        ranked: query id -> document ids, best first (at least max(k_values) long if available).
        qrels: query id -> {document id: relevance grade}; grade <= 0 is not relevant.
        k_values: cut-offs.

    Returns:
        ``{"ndcg_at_10": ..., "map_at_10": ..., "recall_at_10": ..., "precision_at_10": ...,
        "mrr_at_10": ...}`` for every k (fractions in [0, 1]). Queries with no relevant
        document are skipped, like trec_eval; queries missing from ``ranked`` score 0.
    """
    per_metric: dict[str, list[float]] = {}
    for qid, judged in qrels.items():
        relevant = {d: g for d, g in judged.items() if g > 0}
        if not relevant:
            continue
        docs = list(ranked.get(qid, ()))
        gains = np.array([relevant.get(d, 0) for d in docs], dtype=np.float64)
        hits = gains > 0
        discounts = 1.0 / np.log2(np.arange(2, len(docs) + 2))
        ideal = np.sort(np.fromiter(relevant.values(), dtype=np.float64))[::-1]
        ideal_discounts = 1.0 / np.log2(np.arange(2, len(ideal) + 2))
        cum_hits = np.cumsum(hits)
        precision_at_rank = cum_hits / np.arange(1, len(docs) + 1)
        first_hit = int(np.argmax(hits)) + 1 if hits.any() else None
        for k in k_values:
            dcg = float((gains[:k] * discounts[:k]).sum())
            idcg = float((ideal[:k] * ideal_discounts[:k]).sum())
            n_hit = int(hits[:k].sum())
            values = {
                f"ndcg_at_{k}": dcg / idcg,
                f"map_at_{k}": float(precision_at_rank[:k][hits[:k]].sum()) / len(relevant),
                f"recall_at_{k}": n_hit / len(relevant),
                f"precision_at_{k}": n_hit / k,
                f"mrr_at_{k}": 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0,
            }
            for name, value in values.items():
                per_metric.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in per_metric.items()}


def spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation (fraction, not ×100)."""
    return float(stats.spearmanr(predicted, gold).statistic)


def pearson(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation."""
    return float(stats.pearsonr(predicted, gold).statistic)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays -> (N,)."""
    return (l2_normalise(a) * l2_normalise(b)).sum(axis=1)


def pair_similarities(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The four similarities MTEB's pair classification tries; larger = more similar."""
    return {
        "cosine": cosine_rows(a, b),
        "dot": (a * b).sum(axis=1),
        "euclidean": -np.linalg.norm(a - b, axis=1),
        "manhattan": -np.abs(a - b).sum(axis=1),
    }


def best_threshold_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best accuracy over thresholds ``score >= t`` -> (accuracy, threshold)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    # predicting the first i as positive: correct = positives among them + negatives after
    tp = np.concatenate([[0], np.cumsum(y)])
    tn = (~y).sum() - np.concatenate([[0], np.cumsum(~y)])
    acc = (tp + tn) / len(y)
    i = int(np.argmax(acc))
    threshold = float(s[i - 1]) if i > 0 else float("inf")
    return float(acc[i]), threshold


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ranking positives (label 1) above negatives."""
    return float(average_precision_score(labels, scores))


def v_measure(labels: Sequence, clusters: Sequence) -> float:
    """V-measure of a clustering against gold labels."""
    return float(v_measure_score(labels, clusters))
