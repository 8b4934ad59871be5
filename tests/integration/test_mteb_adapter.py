"""The mteb package evaluates an Embedder through the adapter, offline (mteb's mock tasks),
and agrees with embforge's own retrieval metrics on the same real data."""

import json

import pytest

mteb = pytest.importorskip("mteb")
from datasets import Dataset  # noqa: E402  (installed with mteb)
from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask  # noqa: E402
from mteb.mocks.mock_tasks.sts import MockSTSTask  # noqa: E402

from embforge.data.stdlib_code import collect_pairs  # noqa: E402
from embforge.eval.mteb_adapter import to_mteb  # noqa: E402
from embforge.eval.task_config import TaskConfig  # noqa: E402
from embforge.eval.tasks import evaluate_task  # noqa: E402


@pytest.fixture(scope="module")
def code_pairs():
    pairs, _ = collect_pairs()
    return pairs[::25][:120]


def test_mock_tasks_run_offline(tiny_embedder):
    result = mteb.evaluate(to_mteb(tiny_embedder), [MockSTSTask()], cache=None, show_progress_bar=False)
    (task,) = result.task_results
    assert task.task_name == "MockSTSTask" and -1.0 <= task.get_score() <= 1.0


def test_prompts_follow_mteb_prompt_types(tiny_embedder):
    seen = []

    class Spy:
        prompts = tiny_embedder.head.prompts

        def encode(self, texts, batch_size=32, prompt_name=None):
            seen.append(prompt_name)
            return tiny_embedder.encode(texts, prompt_name=prompt_name)

    mteb.evaluate(to_mteb(Spy()), [MockRetrievalTask()], cache=None, show_progress_bar=False)
    assert "query" in seen and "document" in seen


def test_mteb_and_embforge_agree_on_retrieval_metrics(minilm, code_pairs, tmp_path):
    corpus = [{"id": f"d{i}", "title": "", "text": p.positive} for i, p in enumerate(code_pairs)]
    queries = [{"id": f"q{i}", "text": p.query} for i, p in enumerate(code_pairs) if i % 2 == 0]
    qrels = {q["id"]: {"d" + q["id"][1:]: 1} for q in queries}

    class CodeSearch(MockRetrievalTask):
        def load_data(self, num_proc=None, **kwargs):
            split = {
                "queries": Dataset.from_list(queries),
                "corpus": Dataset.from_list(corpus),
                "relevant_docs": qrels,
                "top_ranked": None,
            }
            self.dataset = {"default": {"test": split, "val": split}}
            self.data_loaded = True

    result = mteb.evaluate(to_mteb(minilm), [CodeSearch()], cache=None, show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": c["id"], "title": "", "text": c["text"]}) + "\n" for c in corpus)
    )
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q["id"], "text": q["text"]}) + "\n" for q in queries)
    )
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, r in qrels.items() for d in r)
    )
    ours = evaluate_task(minilm, TaskConfig(name="code", type="retrieval", path="beir"), tmp_path)["scores"]["test"][0]
    for metric in ("ndcg_at_10", "map_at_10", "recall_at_10", "mrr_at_10"):
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-4), metric
