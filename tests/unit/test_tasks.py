"""Task protocols on small synthetic files with a transparent fake model."""

import dataclasses
import json

import numpy as np
import pytest

from embforge.config import from_dict
from embforge.errors import ConfigError, DataError
from embforge.eval.runner import load_suite, run_suite
from embforge.eval.task_config import TaskConfig
from embforge.eval.tasks import evaluate_task

TOPICS = ["apple", "river", "engine", "violin"]


class TopicModel:
    """Embeds a text as the one-hot of the topic words it contains (plus a little noise)."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, batch_size=32, prompt_name=None):
        self.calls.append((len(texts), prompt_name))
        rng = np.random.default_rng(len(texts))
        out = np.array([[float(t.count(w)) for w in TOPICS] for t in texts]) + 1e-3 * rng.random((len(texts), 4))
        return out.astype(np.float32)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_retrieval_oracle_scores_one(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": w, "text": "about it"} for i, w in enumerate(TOPICS)])
    _jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"what is {w}"} for i, w in enumerate(TOPICS)])
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    )
    task = TaskConfig(name="r", type="retrieval", path="beir", query_prompt_name="query")
    model = TopicModel()
    res = evaluate_task(model, task, tmp_path)
    entry = res["scores"]["test"][0]
    assert entry["main_score"] == pytest.approx(1.0) and entry["mrr_at_10"] == pytest.approx(1.0)
    assert model.calls[0] == (4, "query")


def test_sts_pair_classification_reranking_clustering_classification(tmp_path):
    pairs = [
        {"sentence1": f"{a} x", "sentence2": f"{b} y", "score": 5.0 if a == b else 0.0, "label": int(a == b)}
        for a in TOPICS
        for b in TOPICS
    ]
    _jsonl(tmp_path / "pairs.jsonl", pairs)
    sts = evaluate_task(TopicModel(), TaskConfig(name="s", type="sts", path="pairs.jsonl"), tmp_path)
    # binary gold with many ties caps Spearman near 0.75; a model pairing the wrong topics goes negative
    assert sts["scores"]["test"][0]["main_score"] > 0.7

    class Reversed(TopicModel):
        def encode(self, texts, **kw):
            e = super().encode(texts, **kw)
            half = len(texts) // 2
            e[half:] = np.roll(e[half:], 1, axis=1)  # second sentences point at another topic
            return e

    assert (
        evaluate_task(Reversed(), TaskConfig(name="s", type="sts", path="pairs.jsonl"), tmp_path)["scores"]["test"][0][
            "main_score"
        ]
        < -0.3
    )
    pc = evaluate_task(TopicModel(), TaskConfig(name="p", type="pair_classification", path="pairs.jsonl"), tmp_path)
    assert pc["scores"]["test"][0]["main_score"] == pytest.approx(1.0)

    rerank = [{"q": f"{w} question", "a": f"{v} answer", "y": int(w == v)} for w in TOPICS for v in TOPICS]
    rerank.append({"q": "lonely question", "a": "apple", "y": 0})  # no positive: skipped and counted
    _jsonl(tmp_path / "rerank.jsonl", rerank)
    task = from_dict(
        TaskConfig,
        {
            "name": "rr",
            "type": "reranking",
            "path": "rerank.jsonl",
            "fields": {"query": "q", "document": "a", "label": "y"},
        },
    )
    rr = evaluate_task(TopicModel(), task, tmp_path)["scores"]["test"][0]
    assert rr["main_score"] == pytest.approx(1.0) and rr["num_skipped_queries"] == 1

    labelled = [{"text": f"{w} sample {i}", "label": w} for w in TOPICS for i in range(6)]
    _jsonl(tmp_path / "test.jsonl", labelled)
    # the classifier learns from other texts than it is scored on
    _jsonl(tmp_path / "train.jsonl", [{"text": f"{w} example {i}", "label": w} for w in TOPICS for i in range(6)])
    shifted = {w: TOPICS[(k + 1) % len(TOPICS)] for k, w in enumerate(TOPICS)}
    _jsonl(
        tmp_path / "wrong.jsonl", [{"text": f"{w} example {i}", "label": shifted[w]} for w in TOPICS for i in range(6)]
    )
    cl = evaluate_task(
        TopicModel(), TaskConfig(name="c", type="clustering", path="test.jsonl", n_experiments=2), tmp_path
    )
    assert cl["scores"]["test"][0]["main_score"] == pytest.approx(1.0)
    cls = TaskConfig(
        name="k",
        type="classification",
        path="test.jsonl",
        train_path="train.jsonl",
        samples_per_label=3,
        n_experiments=3,
    )
    assert evaluate_task(TopicModel(), cls, tmp_path)["scores"]["test"][0]["main_score"] == pytest.approx(1.0)
    # labels learnt from a training file that names every topic wrongly: every test text is wrong
    wrong = dataclasses.replace(cls, train_path="wrong.jsonl")
    assert evaluate_task(TopicModel(), wrong, tmp_path)["scores"]["test"][0]["main_score"] == pytest.approx(0.0)


def test_task_file_errors(tmp_path):
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n  - {name: a, type: sts, path: x.jsonl, feilds: {}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\]\.feilds' \(did you mean 'fields'\?\)"):
        load_suite(f)
    f.write_text("tasks:\n  - {name: a, type: sts, path: x.jsonl, fields: {scor: s}}\n")
    with pytest.raises(ConfigError, match=r"unknown role 'scor'.*did you mean 'score'"):
        load_suite(f)
    f.write_text("tasks:\n  - {name: a, type: classification, path: x.jsonl}\n")
    with pytest.raises(ConfigError, match="needs train_path"):
        load_suite(f)
    f.write_text("tasks:\n  - {name: a, type: sts, path: x.jsonl}\n")
    suite, root = load_suite(f)
    assert root == tmp_path.resolve()
    with pytest.raises(DataError, match="data file of task 'a' not found"):
        run_suite(TopicModel(), suite, root)
    with pytest.raises(ConfigError, match="unknown task name"):
        run_suite(TopicModel(), suite, root, only=["b"])
    _jsonl(tmp_path / "x.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1}, {"sentence1": "a"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: missing field"):
        run_suite(TopicModel(), suite, root)


def test_instructions_reach_queries_of_models_that_take_them(tmp_path):
    from embforge.eval.runner import load_suite

    (tmp_path / "table.yaml").write_text(
        "by_type: {sts: Retrieve semantically similar text}\nby_task: {special: Find the special one}\n"
    )
    (tmp_path / "tasks.yaml").write_text(
        "instructions: table.yaml\ntasks:\n"
        "  - {name: special, type: sts, path: a.jsonl}\n"
        "  - {name: plain, type: sts, path: b.jsonl}\n"
        "  - {name: own, type: sts, path: c.jsonl, instruction: Mine}\n"
    )
    suite, _ = load_suite(tmp_path / "tasks.yaml")
    assert [t.instruction for t in suite.tasks] == [
        "Find the special one",
        "Retrieve semantically similar text",
        "Mine",
    ]

    from embforge.eval import tasks as T
    from embforge.modeling.head import HeadSpec

    class WithTemplate:  # an embforge model: what it does comes from its head spec
        head = HeadSpec(instruction_template="Instruct: {instruction}\nQuery: ")

    assert T._symmetric_prompt(WithTemplate(), suite.tasks[0]) == {"prompt": "Instruct: Find the special one\nQuery: "}
    assert T._symmetric_prompt(object(), suite.tasks[0]) == {}  # a model without instructions ignores them
    retrieval = T.TaskConfig(name="r", type="retrieval", path="x", instruction="Find passages")
    assert T._query_prompt(WithTemplate(), retrieval) == {"prompt": "Instruct: Find passages\nQuery: "}
    assert T._document_prompt(WithTemplate(), retrieval) == {}  # documents get no instruction


def test_matryoshka_curve_float_and_binary(tmp_path):
    from embforge.eval.tasks import eval_retrieval_dims

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": w, "text": "about it"} for i, w in enumerate(TOPICS)])
    _jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"what is {w}"} for i, w in enumerate(TOPICS)])
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    )

    class Signed(TopicModel):  # +1 / -1 per topic, then 4 dimensions of noise
        def encode(self, texts, batch_size=32, prompt_name=None):
            topics = 2 * super().encode(texts, batch_size, prompt_name).round() - 1  # (N, 4)
            noise = np.random.default_rng(len(texts)).standard_normal((len(texts), 4)) * 0.1
            return np.hstack([topics, noise]).astype(np.float32)

    task = TaskConfig(name="r", type="retrieval", path="beir")
    curve = eval_retrieval_dims(Signed(), task, beir, dims=[8, 4, 1])
    assert curve["4"] == {"float": pytest.approx(1.0), "binary": pytest.approx(1.0)}
    assert curve["8"]["float"] == pytest.approx(1.0)
    assert curve["1"]["float"] < 0.8 and curve["1"]["binary"] < 0.8  # one topic bit cannot tell four apart
    with pytest.raises(ConfigError, match="outside"):
        eval_retrieval_dims(Signed(), task, beir, dims=[9])
