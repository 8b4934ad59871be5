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


def _tied_search_case():
    """Integer embeddings in {-1, 0, 1}: many exactly tied scores, a zero document, odd ids."""
    from embforge.eval import tasks

    rng = np.random.default_rng(3)
    doc_ids = [f"d{i}" for i in rng.permutation(30)] + ["d1x", "D2"]
    q_emb = rng.integers(-1, 2, size=(5, 4)).astype(np.float32)
    d_emb = rng.integers(-1, 2, size=(len(doc_ids), 4)).astype(np.float32)
    d_emb[0] = 0
    ranked = tasks.search(q_emb, d_emb, doc_ids, top_k=10)
    qrels = {}
    for q in range(5):
        inside = rng.choice(10, size=3, replace=False)
        qrels[f"q{q}"] = {ranked[q][j]: int(g) for j, g in zip(inside, [2, 1, 0])}
        qrels[f"q{q}"]["d_missing"] = 1  # relevant but never retrieved
    qrels["q5"] = {"d3": 0}  # no relevant document: skipped
    qrels["q6"] = {"d4": 1}  # judged but not in the run: scores 0
    return q_emb, d_emb, doc_ids, dict(zip([f"q{q}" for q in range(5)], ranked)), qrels


# retrieval_scores on _tied_search_case, from the hand-written implementation this replaced
# (commit e77eef2); the pytrec_eval-backed one must give the same numbers
GOLDEN_TIED = {
    "ndcg_at_1": 0.16666666666666666,
    "map_at_1": 0.1111111111111111,
    "recall_at_1": 0.1111111111111111,
    "precision_at_1": 0.3333333333333333,
    "mrr_at_1": 0.3333333333333333,
    "ndcg_at_3": 0.24080807568026796,
    "map_at_3": 0.16666666666666666,
    "recall_at_3": 0.2222222222222222,
    "precision_at_3": 0.2222222222222222,
    "mrr_at_3": 0.5,
    "ndcg_at_5": 0.2614011496062723,
    "map_at_5": 0.17777777777777778,
    "recall_at_5": 0.27777777777777773,
    "precision_at_5": 0.16666666666666666,
    "mrr_at_5": 0.5333333333333333,
    "ndcg_at_10": 0.4030095424915581,
    "map_at_10": 0.25679012345679014,
    "recall_at_10": 0.5555555555555555,
    "precision_at_10": 0.16666666666666666,
    "mrr_at_10": 0.5333333333333333,
}


def test_retrieval_scores_with_ties_equal_previous_numbers():
    *_, ranked, qrels = _tied_search_case()
    got = metrics.retrieval_scores(ranked, qrels, (1, 3, 5, 10))
    assert got.keys() == GOLDEN_TIED.keys()
    for name, value in GOLDEN_TIED.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_search_ranks_ties_like_trec_eval_on_raw_scores():
    # trec_eval itself, given every raw cosine score, must see the same top 10 as our search
    import pytrec_eval  # a dependency of embforge: never skipped

    from embforge.vectors import l2_normalise

    q_emb, d_emb, doc_ids, ranked, qrels = _tied_search_case()
    scores = l2_normalise(q_emb) @ l2_normalise(d_emb).T  # (Q, N)
    run = {f"q{q}": {d: float(s) for d, s in zip(doc_ids, scores[q])} for q in range(len(q_emb))}
    judged = {q: j for q, j in qrels.items() if q in run}
    trec = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "P.10", "map_cut.10"}).evaluate(run)
    ours = {q: metrics.retrieval_scores({q: ranked[q]}, {q: judged[q]}, (10,)) for q in judged}
    for q in judged:
        assert ours[q]["ndcg_at_10"] == pytest.approx(trec[q]["ndcg_cut_10"], abs=1e-12)
        assert ours[q]["map_at_10"] == pytest.approx(trec[q]["map_cut_10"], abs=1e-12)
        assert ours[q]["precision_at_10"] == pytest.approx(trec[q]["P_10"], abs=1e-12)
