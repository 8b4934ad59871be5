"""The training loop: resume, data-stream position, NaN stop, multi-stage runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import embforge.train.batches as batches
import embforge.train.contrastive as contrastive
import embforge.train.trainer as trainer
from embforge.config import from_dict
from embforge.errors import CheckpointError, DataError
from embforge.train.checkpoint import latest_checkpoint
from embforge.train.parallel import DistInfo
from embforge.train.recipe import RecipeConfig
from embforge.train.stages import run_recipe

from .helpers import crash_in_step, stage_config, tiny_embedder


def _spy_queries(monkeypatch):
    seen = []
    real = contrastive.collate

    def spy(examples, *a, **k):
        seen.append([e.record.query for e in examples])
        return real(examples, *a, **k)

    monkeypatch.setattr(contrastive, "collate", spy)
    return seen


def _train(model, stage, data_dir, out, resume):
    return contrastive.train_stage(
        model, stage, data_root=data_dir, stage_dir=out, recipe_dict={}, info=DistInfo(), seed=3, resume=resume
    )


def test_resume_continues_the_same_trajectory(data_dir, tmp_path, monkeypatch):
    seen = _spy_queries(monkeypatch)
    straight = tiny_embedder(dropout=0.1)  # dropout: the RNG state must be restored too
    _train(straight, stage_config(), data_dir, tmp_path / "a", resume=False)
    straight_batches = list(seen)
    seen.clear()

    interrupted = tiny_embedder(dropout=0.1)
    with crash_in_step(11), pytest.raises(KeyboardInterrupt):
        _train(interrupted, stage_config(), data_dir, tmp_path / "b", resume=False)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000010"
    seen.clear()

    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _train(tiny_embedder(), stage_config(), data_dir, tmp_path / "b", resume=False)  # never silently mixed
    resumed = tiny_embedder(dropout=0.1, seed=123)  # different init: everything must come from the checkpoint
    _train(resumed, stage_config(), data_dir, tmp_path / "b", resume=True)
    assert seen == straight_batches[10:]  # the data stream continues at the same example
    frozen = {n for n, p in resumed.named_parameters() if not p.requires_grad}  # BERT's unused task pooler
    assert frozen == {"backbone.pooler.dense.weight", "backbone.pooler.dense.bias"}
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        if n not in frozen:  # frozen weights come from the starting model, not the checkpoint
            assert torch.allclose(a, b, atol=1e-6), n
    final = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000020" / "model.safetensors"))
    assert torch.allclose(
        final["backbone.embeddings.word_embeddings.weight"],
        straight.state_dict()["backbone.embeddings.word_embeddings.weight"],
    )
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5, 10, 15, 20]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = contrastive.info_nce
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(contrastive, "info_nce", poisoned)
    model = tiny_embedder()
    with pytest.raises(trainer.TrainingError, match=r"loss became nan at step 13.*step-00000010"):
        _train(model, stage_config(), data_dir, tmp_path / "n", resume=False)
    ckpts = sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir())
    assert ckpts == ["step-00000010"]
    weights = load_file(str(tmp_path / "n" / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_samplers_mix_sources_as_configured(data_dir):
    for mode, check in [
        ("single_source", lambda batch: len({e.dataset for e in batch}) == 1),
        ("proportional", lambda batch: sorted(e.dataset for e in batch) == [0, 0, 0, 1]),  # weights 2:1 of 4 -> 3:1
    ]:
        stage = stage_config(
            data={
                **{
                    "batch_size": 4,
                    "num_negatives": 1,
                    "sampler": mode,
                    "datasets": [
                        {"name": "memory", "path": "memory.jsonl", "weight": 2.0},
                        {"name": "stream", "path": "stream-*.jsonl", "stream": True, "weight": 1.0},
                    ],
                }
            }
        )
        sampler, report = batches.build_sampler(stage.data, data_dir, seed=0, world=1)
        assert all(check(sampler.next_batch()) for _ in range(20)), mode
    assert report.read["memory"] == 40


def test_no_duplicate_texts_in_a_batch(tmp_path):
    with (tmp_path / "d.jsonl").open("w") as f:
        for i in range(30):
            f.write(json.dumps({"query": f"q{i % 5}", "positive": f"p{i}"}) + "\n")  # only 5 distinct queries
    stage = stage_config(data={"batch_size": 5, "datasets": [{"name": "d", "path": "d.jsonl"}]})
    sampler, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    for _ in range(10):
        queries = [e.record.query for e in sampler.next_batch()]
        assert len(set(queries)) == len(queries) == 5
    stage = stage_config(data={"batch_size": 6, "datasets": [{"name": "d", "path": "d.jsonl"}]})
    sampler, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    with pytest.raises(DataError, match="dataset 'd' cannot fill a batch of 6 without duplicate texts"):
        sampler.next_batch()


def test_label_text_documents_repeat_in_a_batch_without_in_batch_negatives(tmp_path):
    # NV-Embed stage 2: a binary classification set has two documents (its label texts), so a
    # batch of 8 must repeat them; harmless when no query is scored against another's documents
    with (tmp_path / "cf.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"review number {i}", "label": i % 2}) + "\n")
    cf = {"name": "cf", "path": "cf.jsonl", "format": "classification", "label_texts": {"0": "factual", "1": "wish"}}
    stage = stage_config(data={"batch_size": 8, "num_negatives": 1, "datasets": [cf]})
    sampler, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1, in_batch_negatives=False)
    positives = [e.record.positive for e in sampler.next_batch()]
    assert len(positives) == 8 and set(positives) == {"factual", "wish"}
    sampler, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)  # in-batch negatives: still refused
    with pytest.raises(DataError, match="without duplicate texts"):
        sampler.next_batch()


def test_bad_records_are_errors_or_counted(tmp_path):
    lines = [
        {"query": "q1", "positive": "p1", "negatives": ["p1", "n1"]},  # negative == positive: bad
        {"query": " ", "positive": "p2", "negatives": ["n2"]},  # empty query: bad
        {"query": "q3", "positive": "p3", "negatives": []},  # too few negatives for this stage: skipped, counted
        {"query": "q4", "positive": "p4", "negatives": ["n4"]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = {"batch_size": 1, "num_negatives": 1, "datasets": [{"name": "d", "path": "d.jsonl"}]}
    with pytest.raises(DataError, match=r"d\.jsonl:1: negative 'p1' is also a positive"):  # the default: an error
        batches.build_sampler(stage_config(data=data).data, tmp_path, seed=0, world=1)
    stage = stage_config(data={**data, "on_bad_record": "skip"})
    sampler, report = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    assert report.read["d"] == 4
    assert dict(report.skipped["d"]) == {"positive among negatives": 1, "empty text": 1, "fewer than 1 negatives": 1}
    (tmp_path / "d.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": "q", "positive": 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'positive' must be a string"):
        batches.build_sampler(stage_config(data=data).data, tmp_path, seed=0, world=1)


def test_two_stage_recipe_chains_weights_and_writes_outputs(data_dir, tmp_path):
    model_dir = tiny_embedder().save(tmp_path / "start")
    rows = [{"sentence1": f"the cat {i}", "sentence2": f"the dog {i % 3}", "score": float(i % 5)} for i in range(10)]
    (data_dir / "sts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "tasks.yaml").write_text("tasks:\n  - {name: tiny-sts, type: sts, path: sts.jsonl}\n")
    stage1 = {
        "name": "pairs",
        "steps": 4,
        "log_every": 2,
        "eval_every": 2,
        "eval_tasks": "tasks.yaml",
        "data": {"batch_size": 4, "datasets": [{"name": "m", "path": "memory.jsonl"}]},
    }
    stage2 = {
        "name": "hard",
        "steps": 3,
        "log_every": 1,
        "grad_cache_chunk": 3,
        "grad_accum_steps": 2,
        "data": {"batch_size": 4, "num_negatives": 1, "datasets": [{"name": "m", "path": "memory.jsonl"}]},
        "loss": {"in_batch_negatives": False, "matryoshka_dims": [64, 32]},
    }
    recipe = from_dict(
        RecipeConfig,
        {"model": {"name_or_path": str(model_dir)}, "stages": [stage1, stage2], "output_dir": str(tmp_path / "run")},
    )
    trained = run_recipe(recipe, data_dir, info=DistInfo())
    run = tmp_path / "run"
    assert (run / "final" / "modules.json").is_file() and (run / "curves.png").stat().st_size > 1000
    assert (run / "01-pairs" / "model").is_dir() and (run / "02-hard" / "checkpoints" / "step-00000003").is_dir()
    logged = [json.loads(x) for x in (run / "01-pairs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4] and all(-100 <= r["eval/tiny-sts"] <= 100 for r in logged)
    start = load_file(str(model_dir / "model.safetensors"))
    stage1_end = load_file(str(run / "01-pairs" / "model" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(start[key], stage1_end[key]) and not torch.equal(stage1_end[key], final[key])
    assert torch.equal(trained.backbone.state_dict()[key].cpu(), final[key])
    # a rerun finds both stages finished and only reloads
    again = run_recipe(recipe, data_dir, info=DistInfo())
    assert torch.equal(again.backbone.state_dict()[key].cpu(), final[key])


def test_beir_folder_as_a_training_source(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "T", "text": f"doc {i}"}) + "\n" for i in range(4))
    )
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(4))
    )
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t2\nq2\td2\t0\nq3\td9\t1\n"
    )
    stage = stage_config(data={"batch_size": 2, "datasets": [{"name": "b", "path": "beir", "format": "beir"}]})
    sampler, report = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    pairs = {(e.record.query, e.record.positive) for _ in range(3) for e in sampler.next_batch()}
    assert pairs == {("query 0", "T doc 0"), ("query 1", "T doc 1")}  # grade 0 is not a positive
    assert dict(report.skipped["b"]) == {"qrel names a document missing from the corpus": 1}


def test_resume_with_lora_adapters_and_a_latent_head(data_dir, tmp_path):
    from .helpers import tiny_lora_embedder

    stage = stage_config(data={**stage_config().data.__dict__, "datasets": [{"name": "m", "path": "memory.jsonl"}]})
    straight = tiny_lora_embedder(seed=1)
    _train(straight, stage, data_dir, tmp_path / "a", resume=False)
    saved = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000020" / "model.safetensors"))
    trainable = {n for n, p in straight.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # adapters and head only, not the frozen base

    with crash_in_step(11), pytest.raises(KeyboardInterrupt):
        _train(tiny_lora_embedder(seed=1), stage, data_dir, tmp_path / "b", resume=False)
    resumed = tiny_lora_embedder(seed=99)  # other adapter/head init: they must come from the checkpoint
    _train(resumed, stage, data_dir, tmp_path / "b", resume=True)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_evaluation_runs_every_eval_every_steps_whatever_log_every(data_dir, tmp_path):
    calls = []

    def evaluator(model):
        calls.append(model.training)
        return {"score": float(len(calls))}

    stage = stage_config(steps=6, log_every=3, save_every=0, eval_every=2, eval_tasks="unused.yaml")
    rows = contrastive.train_stage(
        tiny_embedder(),
        stage,
        data_root=data_dir,
        stage_dir=tmp_path / "e",
        recipe_dict={},
        info=DistInfo(),
        seed=3,
        evaluator=evaluator,
    )
    assert [r["step"] for r in rows if "eval/score" in r] == [2, 4, 6]
    assert [r["eval/score"] for r in rows if "eval/score" in r] == [1.0, 2.0, 3.0]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # a row every log_every steps and at every evaluation
    assert calls == [False, False, False]  # evaluated in eval mode (training resumes after)


def test_logged_loss_is_the_mean_over_the_logging_window(data_dir, tmp_path):
    every_step = _train(tiny_embedder(), stage_config(steps=10, log_every=1), data_dir, tmp_path / "a", False)
    windowed = _train(tiny_embedder(), stage_config(steps=10, log_every=4), data_dir, tmp_path / "b", False)
    losses = [r["loss"] for r in every_step]
    assert [r["step"] for r in windowed] == [4, 8, 10]
    expected = [sum(losses[0:4]) / 4, sum(losses[4:8]) / 4, sum(losses[8:10]) / 2]
    assert [r["loss"] for r in windowed] == pytest.approx(expected, rel=1e-5)
    assert [r["loss_last"] for r in windowed] == pytest.approx([losses[3], losses[7], losses[9]], rel=1e-5)
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(expected, rel=1e-5)


def test_nan_gradient_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    _train(tiny_embedder(), stage_config(), data_dir, tmp_path / "ref", resume=False)  # the same run, unpoisoned
    real = contrastive.contrastive_step
    calls = {"n": 0}

    def poisoned(model, *a, **k):
        loss = real(model, *a, **k)  # a finite loss ...
        calls["n"] += 1
        if calls["n"] == 13:  # ... but one NaN in one gradient at step 13
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(contrastive, "contrastive_step", poisoned)
    model = tiny_embedder()
    with pytest.raises(trainer.TrainingError, match=r"gradient norm became nan at step 13.*step-00000010"):
        _train(model, stage_config(), data_dir, tmp_path / "n", resume=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the step never reached the weights
    ckpts = sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir())
    assert ckpts == ["step-00000010"]
    kept = load_file(str(tmp_path / "n" / "checkpoints" / "step-00000010" / "model.safetensors"))
    good = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert kept.keys() == good.keys() and all(torch.equal(kept[k], good[k]) for k in kept)


def test_on_nonfinite_skip_drops_the_step_and_goes_on(data_dir, tmp_path, monkeypatch):
    real = contrastive.info_nce
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("inf") if calls["n"] == 13 else loss

    monkeypatch.setattr(contrastive, "info_nce", poisoned)
    model = tiny_embedder()
    rows = _train(model, stage_config(on_nonfinite="skip"), data_dir, tmp_path / "s", resume=False)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 0]  # step 13 is in the window ending at 15
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)  # the skipped loss is not averaged in
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert latest_checkpoint(tmp_path / "s" / "checkpoints").name == "step-00000020"


def test_multiple_positives_one_sampled_per_epoch_deterministically_and_resumably(tmp_path):
    rows = [{"query": f"q{i}", "positives": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"batch_size": 6, "datasets": [{"name": "d", "path": "d.jsonl"}]}

    def epochs(sampler, n):  # per epoch: query -> the positive it was trained with
        return [{e.record.query: e.positive for e in sampler.next_batch()} for _ in range(n)]

    stage = stage_config(data=data)
    sampler, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    seen = epochs(sampler, 12)
    assert all(len(epoch) == 6 for epoch in seen)  # every record once per epoch
    for i in range(6):
        drawn = [epoch[f"q{i}"] for epoch in seen]
        assert set(drawn) == {f"a{i}", f"b{i}", f"c{i}"}  # each positive gets its turn over 12 epochs
    again, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    assert epochs(again, 12) == seen  # the same seed: the same positives
    other, _ = batches.build_sampler(stage.data, tmp_path, seed=1, world=1)
    assert [sorted(e.values()) for e in epochs(other, 12)] != [sorted(e.values()) for e in seen]
    interrupted, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    state = json.loads(json.dumps(_after(interrupted, 5)))  # a checkpoint's sampler state, through JSON
    resumed, _ = batches.build_sampler(stage.data, tmp_path, seed=0, world=1)
    resumed.load_state_dict(state)
    assert epochs(resumed, 7) == seen[5:]  # resume continues with the same positives


def _after(sampler, n):
    for _ in range(n):
        sampler.next_batch()
    return sampler.state_dict()


def test_a_record_instruction_overrides_the_dataset_instruction(tmp_path, monkeypatch):
    rows = [
        {"query": "sort a list", "positive": "def sort(x): ...", "instruction": "Find Python code"},
        {"query": "the cat", "positive": "a cat sat on the mat"},  # no instruction: the dataset's
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_embedder()
    model.head = model.head.replace(instruction_template="Instruct: {instruction}\nQuery: ")
    prompts = {}
    real = type(model).tokenize

    def spy(self, texts, prompt=None, **k):
        if isinstance(prompt, list):
            prompts.update(zip(texts, prompt))
        return real(self, texts, prompt=prompt, **k)

    monkeypatch.setattr(type(model), "tokenize", spy)
    data = {"batch_size": 2, "datasets": [{"name": "d", "path": "d.jsonl", "instruction": "Find a sentence"}]}
    _train(model, stage_config(steps=1, data=data), tmp_path, tmp_path / "run", resume=False)
    assert prompts["sort a list"] == "Instruct: Find Python code\nQuery: "
    assert prompts["the cat"] == "Instruct: Find a sentence\nQuery: "
    assert prompts["a cat sat on the mat"] == ""  # documents get no instruction


def test_training_embeds_a_text_exactly_as_inference_does(tmp_path, monkeypatch):
    """One tokenisation path: the batch `train_stage` trains on embeds each text exactly as
    `encode_queries` / `encode_documents` do (case folding, prompt, truncation and EOS rules)."""
    rows = [{"query": "Sort A List, Quickly", "positive": "DEF sort(x): return sorted(x)", "negatives": ["The CAT"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_embedder()
    model.head = model.head.replace(prompts={"query": "search_query: ", "document": "search_document: "})
    prompts = {"query_prompt": "search_query: ", "document_prompt": "search_document: "}
    data = {"batch_size": 1, "num_negatives": 1, "datasets": [{"name": "d", "path": "d.jsonl", **prompts}]}
    seen = {}
    real = contrastive.contrastive_step

    def spy(wrapped, batch, *a, **k):  # before the step changes the weights
        with torch.no_grad():
            seen["trained"] = (model(**batch.queries), model(**batch.docs))
        seen["inferred"] = (  # at the stage's precision (fp32)
            model.encode_queries([rows[0]["query"]], precision="fp32"),
            model.encode_documents([rows[0]["positive"], *rows[0]["negatives"]], precision="fp32"),
        )
        return real(wrapped, batch, *a, **k)

    monkeypatch.setattr(contrastive, "contrastive_step", spy)
    _train(model, stage_config(steps=1, data=data), tmp_path, tmp_path / "run", resume=False)
    for trained, inferred in zip(seen["trained"], seen["inferred"]):
        torch.testing.assert_close(trained, torch.from_numpy(inferred), atol=1e-6, rtol=0)
