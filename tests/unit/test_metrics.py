import math

import numpy as np
import pytest

from embforge.eval import metrics


def test_retrieval_scores_hand_computed():
    # q1: relevant d1 (grade 2) and d3 (grade 1); ranking d2, d1, d4, d3
    ranked = {"q1": ["d2", "d1", "d4", "d3"], "q2": ["d9", "d8"]}
    qrels = {"q1": {"d1": 2, "d3": 1, "d2": 0}, "q2": {"d8": 1}, "q3": {"dx": 0}}  # q3: no relevant -> skipped
    s = metrics.retrieval_scores(ranked, qrels, k_values=[1, 3, 10])
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    ndcg_q2 = (1 / math.log2(3)) / 1.0
    assert s["ndcg_at_10"] == pytest.approx((dcg / idcg + ndcg_q2) / 2)
    assert s["ndcg_at_1"] == pytest.approx(0.0)
    assert s["map_at_10"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 / 2) / 2)
    assert s["map_at_3"] == pytest.approx(((1 / 2) / 2 + 1 / 2) / 2)
    assert s["recall_at_3"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["mrr_at_10"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert s["precision_at_1"] == 0.0


def test_rank_top_k_matches_full_sort_with_trec_tie_break():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(7, 40)).astype(np.float32)  # many ties
    ids = [f"d{i}" for i in rng.permutation(40)]
    tie_key = np.empty(40, dtype=np.int64)
    tie_key[np.argsort(np.array(ids, dtype=object))] = np.arange(40)
    got = metrics.rank_top_k(scores, 10, tie_key)
    for q in range(7):
        # trec_eval: score descending, then docno descending
        by_id_desc = sorted(range(40), key=lambda i: ids[i], reverse=True)
        expected = sorted(by_id_desc, key=lambda i: -scores[q, i])[:10]  # stable sort keeps id order in ties
        assert got[q].tolist() == expected


def test_best_threshold_accuracy_matches_brute_force():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=50)
    labels = (scores + rng.normal(scale=0.8, size=50) > 0).astype(int)
    acc, thr = metrics.best_threshold_accuracy(scores, labels)
    brute = max(((scores >= t).astype(int) == labels).mean() for t in list(scores) + [np.inf])
    assert acc == pytest.approx(brute)
    assert ((scores >= thr).astype(int) == labels).mean() == pytest.approx(acc)


def test_correlations_and_similarities():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0]])
    sims = metrics.pair_similarities(a, b)
    assert sims["cosine"].tolist() == pytest.approx([1.0, 0.0])
    assert sims["euclidean"].tolist() == pytest.approx([-1.0, -math.sqrt(5)])
