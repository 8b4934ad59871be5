"""Positive-aware hard-negative mining on a planted case."""

import numpy as np

from embforge.data.mining import mine_hard_negatives


class TableModel:
    """Embeds each known text as a fixed vector, so scores are planted exactly."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size=32, prompt_name=None):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def _unit(angle):
    return [np.cos(angle), np.sin(angle)]


def test_near_copies_of_the_positive_are_dropped_and_true_hard_negatives_kept():
    table = {
        "query": _unit(0.0),
        "positive": _unit(0.30),  # cos 0.955
        "near-copy of positive": _unit(0.05),  # cos 0.999 > 0.95 x 0.955 -> false negative, dropped
        "paraphrase of positive": _unit(0.25),  # cos 0.969 -> dropped too
        "hard negative 1": _unit(0.60),  # cos 0.825 -> kept
        "hard negative 2": _unit(0.70),  # cos 0.765 -> kept
        "easy negative": _unit(2.0),
    }
    corpus = [t for t in table if t != "query"]
    out = mine_hard_negatives(
        TableModel(table), ["query"], [["positive"]], corpus, num_negatives=2, max_score_ratio=0.95
    )
    assert out.negatives == [["hard negative 1", "hard negative 2"]]
    assert out.dropped["above 0.95 x positive score"] == 2 and out.dropped["positive or copy of it"] == 1
    assert out.scores[0][0] == np.float32(np.cos(0.60)).item() or abs(out.scores[0][0] - np.cos(0.60)) < 1e-6
    # without the filter the near-copies come first: the filter is what removes them
    plain = mine_hard_negatives(
        TableModel(table), ["query"], [["positive"]], corpus, num_negatives=2, max_score_ratio=None
    )
    assert plain.negatives == [["near-copy of positive", "paraphrase of positive"]]


def test_ratio_filter_with_a_negative_positive_score():
    """pos < 0: a negative must still score at least (1 - ratio) x |pos| below the positive, never above it."""
    table = {
        "query": _unit(0.0),
        "positive": _unit(1.80),  # cos -0.227: threshold -0.227 - 0.05 x 0.227 = -0.2385
        "above the positive": _unit(1.70),  # cos -0.129 -> dropped
        "just above the positive": _unit(1.79),  # cos -0.217 -> dropped (0.95 x pos = -0.216 kept it)
        "just below the positive": _unit(1.81),  # cos -0.237 > -0.2385 -> dropped
        "hard negative 1": _unit(1.85),  # cos -0.276 -> kept
        "hard negative 2": _unit(1.95),  # cos -0.370 -> kept
        "easy negative": _unit(3.0),
    }
    corpus = [t for t in table if t != "query"]
    out = mine_hard_negatives(
        TableModel(table), ["query"], [["positive"]], corpus, num_negatives=2, max_score_ratio=0.95
    )
    assert out.positive_scores[0] < 0
    assert out.negatives == [["hard negative 1", "hard negative 2"]]
    assert out.dropped["above 0.95 x positive score"] == 3


def test_ratio_filter_never_keeps_a_negative_scoring_near_or_above_its_positive():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angles = rng.uniform(0, np.pi, size=12)
        table = {"query": _unit(0.0), **{f"t{i}": _unit(a) for i, a in enumerate(angles)}}
        corpus = [t for t in table if t != "query"]
        out = mine_hard_negatives(
            TableModel(table), ["query"], [["t0"]], corpus, num_negatives=3, max_score_ratio=0.9, search_depth=20
        )
        pos = out.positive_scores[0]
        assert all(s <= pos - 0.1 * abs(pos) + 1e-6 for s in out.scores[0]), (pos, out.scores[0])
