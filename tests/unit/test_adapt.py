"""`embforge adapt` on a tiny model and a made-up corpus: input checks, pseudo-queries, the run, resume, the report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from embforge.adapt.corpus import llm_queries, pseudo_queries, read_folder, sentences
from embforge.adapt.pipeline import AdaptSettings, adapt
from embforge.adapt.steps import held_scores
from embforge.cli import main
from embforge.errors import ConfigError, DataError
from embforge.models.embedder import Embedder
from embforge.models.tiny import TINY_WORDS

from .fake_llm import FakeLLM
from .train.helpers import crash_in_step, tiny_embedder


def _sentence(rng, n):
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n)).capitalize() + "."


def write_corpus(folder, n=60, labelled=0, seed=0):
    """``n`` passages of three sentences (every other one titled); ``labelled`` queries in queries + qrels/train."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for i in range(n):
            text = " ".join(_sentence(rng, rng.randint(5, 9)) for _ in range(3))
            title = " ".join(rng.choice(TINY_WORDS) for _ in range(3)) if i % 2 else ""
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": text}) + "\n")
    if labelled:
        (folder / "qrels").mkdir(exist_ok=True)
        with (folder / "queries.jsonl").open("w") as q, (folder / "qrels" / "train.tsv").open("w") as r:
            r.write("query-id\tcorpus-id\tscore\n")
            for i in range(labelled):
                q.write(json.dumps({"_id": f"q{i}", "text": _sentence(rng, 4)}) + "\n")
                r.write(f"q{i}\td{i}\t1\n")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_embedder(seed=0).save(tmp_path_factory.mktemp("adapt-model") / "m")


def settings(model_dir, data, **over):
    base = dict(
        model=str(model_dir),
        data=str(data),
        minutes=0.5,
        steps=12,
        batch_size=8,
        eval_corpus=60,
        lr=1e-3,
        max_negative_ratio=1.0,
    )  # an untrained tiny model scores everything alike
    return AdaptSettings(**{**base, **over})


# ---------------------------------------------------------------------------- input
def test_bad_folders_are_named_with_file_and_line(tmp_path):
    with pytest.raises(DataError, match="no corpus.jsonl"):
        read_folder(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("\n")
    with pytest.raises(DataError, match="corpus.jsonl: the corpus is empty"):
        read_folder(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x y z"}\n{"_id": "b", "text": \n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: invalid JSON"):
        read_folder(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x y z"}\n{"_id": "a", "text": "u v"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: corpus id 'a' appears twice"):
        read_folder(tmp_path)
    folder = write_corpus(tmp_path / "ok", n=5, labelled=3)
    with (folder / "qrels" / "train.tsv").open("a") as f:
        f.write("q1\tnope\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:5: corpus id 'nope' is not in corpus.jsonl"):
        read_folder(folder)
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td0\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:2: query id 'q9' is not in queries.jsonl"):
        read_folder(folder)
    (folder / "qrels" / "train.tsv").unlink()
    with pytest.raises(DataError, match="queries.jsonl without qrels/train.tsv"):
        read_folder(folder)


def test_only_the_train_qrels_are_read(tmp_path):
    folder = write_corpus(tmp_path / "c", n=8, labelled=4)
    (folder / "qrels" / "test.tsv").write_text("this file would fail to parse\n")
    (folder / "qrels" / "dev.tsv").write_text("neither would this one\n")
    data = read_folder(folder)
    assert [p.doc_id for p in data.labelled] == ["d0", "d1", "d2", "d3"]


def test_structural_pseudo_queries():
    assert sentences("One two three. Four five six! Seven?") == ["One two three.", "Four five six!", "Seven?"]
    data = read_folder_from_rows(
        [{"_id": "a", "title": "A title here", "text": "First sentence has five words. " + "More words " * 6 + "end."}]
    )
    pairs = pseudo_queries(data)
    kinds = {p.kind: p for p in pairs}
    assert kinds["title"].query == "A title here" and kinds["title"].doc_id == "a"
    first = kinds["first-sentence"]
    assert first.query == "First sentence has five words." and "First sentence" not in first.positive
    assert first.positive.startswith("A title here More words")
    assert pseudo_queries(data, seed=0) == pseudo_queries(data, seed=0)
    fragment = kinds["fragment"]
    assert 4 <= len(fragment.query.split()) <= 9 and fragment.query not in fragment.positive


def test_definition_questions():
    from embforge.adapt.corpus import definition_question as ask

    assert ask("Gradient descent is an iterative optimisation algorithm.") == "what is gradient descent"
    assert ask("Principal component analysis (PCA) is a technique for reducing dimensions.") == (
        "what is principal component analysis"
    )
    assert ask("Support vectors are the points closest to the boundary.") == "what are support vectors"
    assert ask("Overfitting refers to a model that learns the noise.") == "what is overfitting"
    assert ask("It is a method that works.") is None  # no subject
    assert ask("Eigenvectors can be used to represent a matrix.") is None  # not a definition
    rows = [
        {"_id": "d", "title": "", "text": "A Markov chain is a stochastic model. " + "It has states and moves. " * 3}
    ]
    (pair,) = [p for p in pseudo_queries(read_folder_from_rows(rows)) if p.kind == "definition"]
    assert pair.query == "what is markov chain" and "stochastic" not in pair.positive


def read_folder_from_rows(rows):
    from embforge.adapt.corpus import AdaptData

    return AdaptData(
        [r["_id"] for r in rows],
        [f"{r['title']} {r['text']}".strip() for r in rows],
        [r["title"] for r in rows],
        [r["text"] for r in rows],
    )


def test_llm_queries_through_an_openai_compatible_endpoint(tmp_path):
    fake = FakeLLM(script=["bad_schema", "429"])
    try:
        data = read_folder(write_corpus(tmp_path / "c", n=10))
        pairs = llm_queries(data, fake.url, "fake", count=4, seed=1)
    finally:
        fake.close()
    assert len(pairs) == 4 and all(p.kind == "llm" and p.query.startswith("what about ") for p in pairs)
    assert all(data.text_of(p.doc_id) == p.positive for p in pairs)


# ---------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("adapt-run")
    data = write_corpus(root / "data")
    report = adapt(settings(model_dir, data), root / "out")
    return root, data, report


def test_corpus_only_run_writes_a_model_a_report_and_a_plot(corpus_run, model_dir):
    root, data, report = corpus_run
    out = root / "out"
    assert report["mode"] == "corpus-only" and report["plan"]["steps"] == 12
    assert report["pairs"]["made: title"] > 0 and report["pairs"]["train"] > 0
    assert report["pairs"]["kept: first-sentence"] <= report["pairs"]["made: first-sentence"]
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file()
    assert "| base |" in (out / "report.md").read_text()
    final = Embedder.load(out / "final", device="cpu")
    # the saved model is the chosen merge: its held-back score is the one the search recorded
    from embforge.adapt.corpus import read_folder as read
    from embforge.adapt.settings import Work
    from embforge.adapt.steps import Corpus

    corpus = Corpus(read(data))
    held = Work(out / "work").read_pairs("held.jsonl")
    ids = sorted({h["doc"] for h in held}) + [i for i in range(len(corpus.texts)) if i not in {h["doc"] for h in held}]
    assert len(ids) == len(corpus.texts)  # eval_corpus 60 covers the whole corpus
    got = held_scores(final, held, corpus, ids, 64)["ndcg_at_10"]
    assert got == pytest.approx(report["held_back"]["final"]["ndcg_at_10"], abs=0.05)
    # nothing held back was trained on
    trained = {corpus.of_id[p["doc_id"]] for p in Work(out / "work").read_pairs("pairs.jsonl")}
    assert trained and not trained & {h["doc"] for h in held}


def test_a_rerun_finishes_from_the_saved_steps_and_other_settings_are_refused(corpus_run, model_dir):
    root, data, report = corpus_run
    again = adapt(settings(model_dir, data), root / "out")
    assert again["sessions"] == 2 and again["merge_weight"] == report["merge_weight"]
    assert again["held_back"] == report["held_back"]
    with pytest.raises(ConfigError, match="other settings.*lr"):
        adapt(settings(model_dir, data, lr=1e-2), root / "out")


def test_killed_in_training_and_rerun_equals_an_uninterrupted_run(tmp_path, model_dir):
    data = write_corpus(tmp_path / "data", labelled=60)
    straight = adapt(settings(model_dir, data), tmp_path / "a")
    assert straight["mode"] == "supervised" and straight["pairs"]["labelled"] == 60
    # by default the labelled pairs train alone (20 queries held back)
    assert straight["pairs"]["train"] == 40 and straight["mined"]["pseudo"] == 0
    assert not any(k.startswith("made:") for k in straight["pairs"])
    with crash_in_step(7), pytest.raises(KeyboardInterrupt):
        adapt(settings(model_dir, data), tmp_path / "b")
    resumed = adapt(settings(model_dir, data), tmp_path / "b")
    for w, scores in straight["curve"].items():
        assert resumed["curve"][w] == pytest.approx(scores)
    a = Embedder.load(tmp_path / "a" / "final", device="cpu").encode(["alpha beta", "gamma"])
    b = Embedder.load(tmp_path / "b" / "final", device="cpu").encode(["alpha beta", "gamma"])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_cli_runs_adapt(tmp_path, model_dir):
    data = write_corpus(tmp_path / "data", n=40)
    args = ["adapt", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "4"]
    args += ["--max-negative-ratio", "1.0"]
    assert main([*args, "--batch-size", "8", "--minutes", "1"]) == 0
    assert Embedder.load(tmp_path / "out" / "final", device="cpu").encode(["a b"]).shape == (1, 64)
    assert main(["adapt", str(model_dir), "--data", str(tmp_path / "none"), "--output", str(tmp_path / "x")]) == 2


def test_the_merge_weight_search_refines_towards_the_better_side_and_prefers_the_trained_model_within_noise():
    from embforge.adapt.steps import search_weight

    def run(curve, tolerance=1.0):
        asked = []

        def score(w):
            asked.append(w)
            return {"ndcg_at_10": curve(w)}

        scores, chosen = search_weight(score, tolerance)
        return asked, sorted(float(w) for w in scores), chosen

    # peak between 0.5 and 1: refines at 0.75 and picks it
    assert run(lambda w: 70 - 40 * (w - 0.7) ** 2) == ([0.0, 1.0, 0.5, 0.75], [0.0, 0.5, 0.75, 1.0], 0.75)
    # training hurt: refines at 0.25, which is more than the tolerance below the base -> the base
    assert run(lambda w: 60 - 10 * w - 0.1 * (w > 0))[2] == 0.0
    # a plateau: the largest weight within the tolerance of the best (a blend 0.4 above the trained
    # model on a slice of 100 queries is noise; measured on MLQuestions, it cost test nDCG@10)
    assert run(lambda w: 70.0 if w >= 0.5 else 60.0)[2] == 1.0
    assert run(lambda w: {0.0: 60.0, 0.5: 70.4, 0.75: 70.2, 1.0: 70.0}[w])[2] == 1.0
    # a blend better than the trained model by more than the tolerance is kept
    assert run(lambda w: {0.0: 60.0, 0.5: 72.0, 0.75: 71.5, 1.0: 70.0}[w])[2] == 0.75


def test_pseudo_queries_join_labelled_pairs_only_when_asked(tmp_path, model_dir):
    data = write_corpus(tmp_path / "data", labelled=60)
    report = adapt(settings(model_dir, data, pseudo=True, steps=2), tmp_path / "out")
    assert report["pairs"]["made: title"] > 0 and report["mined"]["labelled"] > 0 and report["mined"]["pseudo"] > 0
    assert set(report["plan"]["batch_shares"]) == {"labelled", "pseudo"}


def test_runs_of_other_seeds_are_averaged_into_the_soup(tmp_path, model_dir):
    import torch

    data = write_corpus(tmp_path / "data", labelled=60)
    report = adapt(settings(model_dir, data, runs=2, steps=3), tmp_path / "out")
    assert report["plan"]["runs"] == 2
    train = tmp_path / "out" / "train"
    a, b, soup = (
        Embedder.load(train / name, device="cpu").state_dict() for name in ("run-0/final", "run-1/final", "soup")
    )
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert any(not torch.equal(a[k], b[k]) for k in floats)  # other seeds, other models
    for k in floats:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
