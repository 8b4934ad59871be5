"""Evaluation metrics: numpy/scipy/scikit-learn/pytrec_eval (no torch, no models).

Retrieval metrics are ``pytrec_eval``'s (trec_eval), called as MTEB calls it:
documents are ranked by score, ties broken by document id in *descending* string order
(trec_eval's rule); nDCG uses the relevance grade as linear gain and the ideal ranking
of all judged-relevant documents; MAP@k divides by the total number of relevant
documents; MRR@k is the reciprocal rank of the first relevant document within k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytrec_eval
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
    """nDCG@k, MAP@k, Recall@k, P@k and MRR@k averaged over the judged queries, by ``pytrec_eval``.

    ``ranked`` is already in trec_eval's order (:func:`rank_top_k` breaks ties like it), so
    it reaches ``pytrec_eval`` as strictly decreasing scores that keep exactly that order.
    MRR@k is the reciprocal rank of the first relevant document within k, as MTEB computes
    it (trec_eval's ``recip_rank`` has no cut-off).

    Args:
        ranked: query id -> document ids, best first (at least max(k_values) long if available).
        qrels: query id -> {document id: relevance grade}; grade <= 0 is not relevant.
        k_values: cut-offs.

    Returns:
        ``{"ndcg_at_10": ..., "map_at_10": ..., "recall_at_10": ..., "precision_at_10": ...,
        "mrr_at_10": ...}`` for every k (fractions in [0, 1]). Queries with no relevant
        document are skipped, like trec_eval; queries missing from ``ranked`` score 0.
    """
    # negative grades count as 0 (not relevant, no negative gain)
    judged = {q: {d: max(int(g), 0) for d, g in docs.items()} for q, docs in qrels.items()}
    judged = {q: docs for q, docs in judged.items() if any(docs.values())}
    if not judged:
        return {}
    run = {q: {d: float(len(ranked[q]) - i) for i, d in enumerate(ranked[q])} for q in judged if ranked.get(q)}
    cuts = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{cuts}", f"map_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}"}
    per_query = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run) if run else {}
    names = {"ndcg_at": "ndcg_cut", "map_at": "map_cut", "recall_at": "recall", "precision_at": "P"}
    out: dict[str, float] = {}
    for k in k_values:
        for ours, trec in names.items():
            out[f"{ours}_{k}"] = sum(per_query[q][f"{trec}_{k}"] for q in per_query) / len(judged)
        out[f"mrr_at_{k}"] = sum(_reciprocal_rank(run.get(q, {}), judged[q], k) for q in judged) / len(judged)
    return out


def _reciprocal_rank(run: dict[str, float], judged: dict[str, int], k: int) -> float:
    """1 / rank of the first relevant document among the first ``k`` of ``run`` (dict in rank order)."""
    for rank, doc in enumerate(list(run)[:k], start=1):
        if judged.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


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
