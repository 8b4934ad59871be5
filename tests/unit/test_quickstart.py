"""The quickstart mines through the public file API (``mine_file``), with the same result as in memory."""

import json

import numpy as np
from rich.console import Console

from embforge.apps.quickstart import mine_stdlib_negatives
from embforge.data.mining import mine_hard_negatives
from embforge.data.stdlib_code import CodePair, write_pairs_jsonl


class HashModel:
    """Deterministic bag-of-character-trigram embeddings (no weights, no downloads)."""

    def encode(self, texts, batch_size=32, prompt_name=None, **kwargs):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for j in range(len(t) - 2):
                out[i, sum(map(ord, t[j : j + 3])) % 64] += 1.0
        return out


def test_quickstart_mining_goes_through_mine_file_and_matches_in_memory_mining(tmp_path, monkeypatch):
    import embforge.data.mining as mining

    rng = np.random.default_rng(0)
    words = ["sort", "list", "path", "join", "read", "file", "parse", "json", "open", "socket", "split", "text"]
    train = []
    for i in range(40):
        a, b, c = rng.choice(words, size=3, replace=False)
        train.append(CodePair(f"{a} the {b} {i}", f"def {a}_{b}(x):\n    return {c}(x) + {i}", f"mod{i % 5}", a))
    train_jsonl = write_pairs_jsonl(train, tmp_path / "train.jsonl")

    calls = []
    real_mine_file = mining.mine_file
    monkeypatch.setattr(mining, "mine_file", lambda *a, **k: calls.append(a) or real_mine_file(*a, **k))
    out = mine_stdlib_negatives(HashModel(), train, train_jsonl, tmp_path / "hard.jsonl", Console(quiet=True))
    assert len(calls) == 1

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = mine_hard_negatives(
        HashModel(),
        [p.query for p in train],
        [[p.positive] for p in train],
        [p.positive for p in train],
        num_negatives=3,
        skip_top=2,
        search_depth=30,
        max_score_ratio=0.95,
    )
    assert [(r["query"], r["positive"], r["source"]) for r in rows] == [(p.query, p.positive, p.module) for p in train]
    assert [r["negatives"] for r in rows] == expected.negatives
    assert any(r["negatives"] for r in rows)
