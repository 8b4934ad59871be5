"""Per-dataset options of a stage's data mix: instructions on documents, own numbers of negatives,
STS negatives mined by a teacher."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import embforge.train.contrastive as contrastive
import embforge.train.sts_mining as sts_mining
from embforge.config import from_dict
from embforge.data.pairs import Example
from embforge.data.records import TrainingRecord
from embforge.errors import ConfigError
from embforge.train.batches import build_sampler, document_prompt
from embforge.train.checkpoint import latest_checkpoint
from embforge.train.contrastive import contrastive_step
from embforge.train.parallel import DistInfo
from embforge.train.recipe import DataConfig, LossConfig, load_recipe

from .helpers import crash_in_step, grads, make_batch, records, stage_config, tiny_embedder

TEMPLATE = "Instruct: {instruction}\nQuery: "


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train(model, stage, data_dir, out, resume=False):
    return contrastive.train_stage(
        model, stage, data_root=data_dir, stage_dir=out, recipe_dict={}, info=DistInfo(), seed=3, resume=resume
    )


# ---------------------------------------------------------------------------- instruction on documents
def test_instruction_on_documents_embeds_documents_like_instructed_queries(tmp_path, monkeypatch):
    rows = [{"query": "a man plays guitar", "positive": "a person plays a guitar", "negatives": ["the cat sleeps"]}]
    _jsonl(tmp_path / "d.jsonl", rows)
    model = tiny_embedder()
    model.head = model.head.replace(instruction_template=TEMPLATE, pool_prompt=False)  # NV-Embed: not pooled
    instruction = "Retrieve semantically similar text"
    ds = {"name": "d", "path": "d.jsonl", "instruction": instruction, "instruction_on_documents": True}
    seen = {}
    real = contrastive.contrastive_step

    def spy(wrapped, batch, *a, **k):  # before the step changes the weights
        with torch.no_grad():
            seen["docs"] = model(**batch.docs)
        seen["instructed"] = model.encode(
            [rows[0]["positive"], *rows[0]["negatives"]],
            prompt=TEMPLATE.format(instruction=instruction),
            precision="fp32",
        )
        seen["bare"] = model.encode([rows[0]["positive"]], prompt="", precision="fp32")
        return real(wrapped, batch, *a, **k)

    monkeypatch.setattr(contrastive, "contrastive_step", spy)
    data = {"batch_size": 1, "num_negatives": 1, "datasets": [ds]}
    _train(model, stage_config(steps=1, data=data), tmp_path, tmp_path / "run")
    # the positive and the negative carry the query's templated instruction, masked out of pooling as on queries
    torch.testing.assert_close(seen["docs"], torch.from_numpy(seen["instructed"]), atol=1e-6, rtol=0)
    assert not torch.allclose(seen["docs"][:1], torch.from_numpy(seen["bare"]), atol=1e-4)  # attended to


def test_the_cpu_twin_gets_the_same_document_prompts_as_before():
    """cpu_smollm2.yaml swapped its literal document_prompt for instruction_on_documents: same prompts."""
    path = Path(str(resources.files("embforge") / "recipes" / "nv_embed" / "cpu_smollm2.yaml"))
    recipe, _ = load_recipe(path)
    template = recipe.model.instruction_template
    before = "Instruct: Retrieve semantically similar text\nQuery: "  # what the recipe spelled out until now
    found = []
    for stage in recipe.stages:
        for i, ds in enumerate(stage.data.datasets):
            example = Example(i, TrainingRecord("x", ["y"]), "y", [])
            got = document_prompt(example, stage.data, lambda ins: template.format(instruction=ins))
            if ds.instruction_on_documents:
                found.append(ds.name)
                assert got == before and ds.document_prompt == "", ds.name
            else:
                assert got == "", ds.name
    assert found == ["snli-dev", "snli-test", "snli", "mrpc"]


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"instruction_on_documents": True}, "needs an instruction"),
        ({"instruction": "x", "document_prompt": "d: ", "instruction_on_documents": True}, "no document_prompt"),
        ({"negatives": "mined"}, "applies to format: sts"),
        ({"format": "sts", "mining_model": "teacher"}, "applies to negatives: mined"),
        ({"format": "sts", "negatives": "mined", "max_score_ratio": 1.5}, r"must be in \(0, 1\]"),
        ({"num_negatives": -1}, "must be >= 0"),
    ],
)
def test_dataset_options_are_checked(dataset, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, {"datasets": [{"name": "d", "path": "d.jsonl", **dataset}]})


# ---------------------------------------------------------------------------- num_negatives per dataset
def _mixed_stage(tmp_path, **over):
    """Retrieval pairs with 3 negatives beside binary classification with its one (label texts)."""
    _jsonl(
        tmp_path / "pairs.jsonl",
        [{"query": r.query, "positive": r.positive, "negatives": r.negatives} for r in records(30, 3, seed=4)],
    )
    _jsonl(tmp_path / "cf.jsonl", [{"text": f"review number {i}", "label": i % 2} for i in range(30)])
    cf = {
        "name": "cf",
        "path": "cf.jsonl",
        "format": "classification",
        "label_texts": {"0": "factual", "1": "wish"},
        "num_negatives": 1,
        "in_batch_negatives": False,
    }
    data = {
        "batch_size": 6,
        "num_negatives": 3,
        "no_duplicates": False,
        "datasets": [{"name": "pairs", "path": "pairs.jsonl"}, cf],
    }
    return stage_config(data=data, **over)


def test_datasets_with_their_own_num_negatives_blend_in_one_stage(tmp_path, monkeypatch):
    stage = _mixed_stage(tmp_path, steps=4, save_every=0)
    sampler, _ = build_sampler(stage.data, tmp_path, seed=0, world=1)
    counts = {}
    for _ in range(5):
        for e in sampler.next_batch():
            counts.setdefault(stage.data.datasets[e.dataset].name, set()).add(len(e.negatives))
    assert counts == {"pairs": {3}, "cf": {1}}
    batches = []
    real = contrastive.contrastive_step

    def spy(wrapped, batch, *a, **k):
        batches.append(batch)
        return real(wrapped, batch, *a, **k)

    monkeypatch.setattr(contrastive, "contrastive_step", spy)
    rows = _train(tiny_embedder(), stage, tmp_path, tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for batch in batches:  # documents: the real ones only (B + ΣN_i), no padding is embedded
        assert batch.num_negatives == 3
        assert batch.docs["input_ids"].shape[0] == 6 + int(batch.negative_counts.sum())


@pytest.mark.parametrize(("chunk", "dims"), [(0, None), (3, [64, 16])])
def test_mixed_negatives_gradients_of_grad_cache_and_matryoshka_equal_the_plain_step(chunk, dims):
    recs = records(6, 2, seed=7)
    flags = [True, False, True, False, False, True]  # dataset b (no in-batch negatives) has 1 negative
    cfg = LossConfig(temperature=0.05, symmetric=True, matryoshka_dims=dims or [])

    def run(grad_cache_chunk):
        model = tiny_embedder()
        model.train()
        batch = make_batch(model, recs, 2, flags, b_negatives=1)
        assert batch.negative_counts.tolist() == [2, 1, 2, 1, 1, 2]
        loss = contrastive_step(model, batch, cfg, DistInfo(), grad_cache_chunk=grad_cache_chunk)
        return loss.item(), grads(model)

    plain_loss, plain = run(0)
    loss, got = run(chunk)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, g in plain.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4)


def test_a_query_is_never_scored_against_padding():
    """The loss of a mixed batch equals the loss of its queries with only their real documents."""
    recs = records(4, 2, seed=8)
    flags = [False, True, False, True]
    cfg = LossConfig(temperature=0.05, in_batch_negatives=False)
    model = tiny_embedder()
    mixed = make_batch(model, recs, 2, flags, b_negatives=0)  # dataset b: no negatives at all
    with torch.no_grad():
        q, d = model(**mixed.queries), model(**mixed.docs)
    loss = contrastive.make_loss_fn(mixed, cfg, DistInfo())(q, d)
    # by hand: without in-batch negatives, query i scores its positive against its own negatives only
    expected, neg = [], 4
    for i, flag in enumerate(flags):
        own = [i] + ([neg, neg + 1] if flag else [])
        neg += 2 if flag else 0
        scores = q[i] @ d[own].T / 0.05
        expected.append(-(scores[0] - torch.logsumexp(scores, 0)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------- mined STS negatives
def _sts_stage(tmp_path, **over):
    words = [r.query for r in records(40, 0, seed=9)]
    rows = [
        {"sentence1": a, "sentence2": b, "score": 5.0 if i % 2 else 1.0}
        for i, (a, b) in enumerate(zip(words, words[1:]))
    ]
    _jsonl(tmp_path / "sts.jsonl", rows)
    ds = {"name": "sts", "path": "sts.jsonl", "format": "sts", "negatives": "mined", "in_batch_negatives": False}
    return stage_config(data={"batch_size": 4, "num_negatives": 2, "no_duplicates": False, "datasets": [ds]}, **over)


def test_mined_sts_negatives_come_from_the_starting_model_and_a_resume_reuses_them(tmp_path, monkeypatch):
    stage = _sts_stage(tmp_path, steps=4, save_every=2)
    teachers, real = [], sts_mining.mined_sts_records

    def spy(sts, name, teacher, **k):
        teachers.append(teacher)
        out = real(sts, name, teacher, **k)
        for r in out:
            assert len(r.negatives) == 2 and r.query not in r.negatives and r.positive not in r.negatives
        return out

    monkeypatch.setattr(sts_mining, "mined_sts_records", spy)
    model = tiny_embedder()
    with crash_in_step(3), pytest.raises(KeyboardInterrupt):
        _train(model, stage, tmp_path, tmp_path / "run")
    assert teachers == [model]  # the stage's starting model, mined once when the stage built its data
    (saved,) = (tmp_path / "run" / "mined").glob("sts-*.json")
    rows = json.loads(saved.read_text())["rows"]
    assert rows and all(len(negs) == 2 for _, _, negs in rows)

    _train(tiny_embedder(), stage, tmp_path, tmp_path / "run", resume=True)  # resumed: the saved negatives
    assert len(teachers) == 1 and latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000004"
    _train(tiny_embedder(), stage, tmp_path, tmp_path / "fresh")  # a fresh start mines again, alike
    assert len(teachers) == 2
    assert json.loads(next((tmp_path / "fresh" / "mined").glob("sts-*.json")).read_text())["rows"] == rows
