"""Distillation from a teacher embedder: the loss terms, the on-disk teacher cache, training and resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embforge.cli import main
from embforge.errors import ConfigError
from embforge.losses import embedding_distance, similarity_kl
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_bert
from embforge.train.checkpoint import latest_checkpoint
from embforge.train.distill import PROJECTION, TeacherCache, text_digest

from .helpers import crash_in_step, stage_config, tiny_embedder, train_on


def distill_stage(teacher_dir, cache_dir, steps=10, log_every=5, **loss):
    return stage_config(
        steps=steps,
        save_every=5,
        log_every=log_every,
        loss={
            "temperature": 0.05,
            "contrastive_weight": 0.0,
            "distill": {"teacher": str(teacher_dir), "cache_dir": str(cache_dir), "precision": "fp32"},
            **loss,
        },
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_embedder(seed=0).save(tmp_path_factory.mktemp("teacher") / "t")


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory):
    """A teacher of another width (96 vs the student's 64): the embedding term needs the projection."""
    model, tokenizer = tiny_bert(7, hidden_size=96, intermediate_size=192)
    return Embedder(model, tokenizer, HeadSpec(max_seq_len=32)).save(tmp_path_factory.mktemp("wide") / "t")


def rows(stage_dir):
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- the terms against naive loops
def test_similarity_kl_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    allowed = torch.rand(5, 9, generator=g) > 0.4
    allowed[:, 0] = True
    expected = 0.0
    for i in range(5):
        cols = [j for j in range(9) if allowed[i, j]]
        zs = sum(math.exp(float(s[i, j]) / 0.05) for j in cols)
        zt = sum(math.exp(float(t[i, j]) / 0.1) for j in cols)
        for j in cols:
            p, q = math.exp(float(t[i, j]) / 0.1) / zt, math.exp(float(s[i, j]) / 0.05) / zs
            expected += p * math.log(p / q) / 5
    assert float(similarity_kl(s, t, allowed, 0.05, 0.1)) == pytest.approx(expected, rel=1e-4)
    assert float(similarity_kl(t, t, allowed, 0.1, 0.1)) == pytest.approx(0.0, abs=1e-6)


def test_embedding_distances_equal_their_definitions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    cos = [float(s[i] @ t[i] / s[i].norm() / t[i].norm()) for i in range(4)]
    assert float(embedding_distance(s, t, "cosine")) == pytest.approx(sum(1 - c for c in cos) / 4, rel=1e-5)
    assert float(embedding_distance(s, t, "mse")) == pytest.approx(float(((s - t) ** 2).sum()) / 24, rel=1e-5)


# ---------------------------------------------------------------------------- the cache
def test_the_cache_keeps_whole_records_after_a_write_cut_short(tmp_path):
    cache = TeacherCache(tmp_path, dim=3, identity="t")
    keys = [text_digest("p: ", t) for t in ("a", "b")]
    cache.put(keys, np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32))
    cache.close()
    part = tmp_path / "part-00000.bin"
    with part.open("ab") as f:
        f.write(b"\x01" * 21)  # a kill in the middle of the next record
    again = TeacherCache(tmp_path, dim=3, identity="t")
    assert len(again) == 2 and part.stat().st_size == 2 * (16 + 12)
    np.testing.assert_array_equal(again.get(keys[1]), [4, 5, 6])
    assert again.get(text_digest("", "a")) is None  # the prompt is part of the key
    again.close()
    with pytest.raises(Exception, match="3 dimensions, the teacher 4"):
        TeacherCache(tmp_path, dim=4, identity="t")


# ---------------------------------------------------------------------------- training
def test_a_copy_of_the_teacher_has_distillation_loss_about_zero(data_dir, tmp_path, teacher_dir):
    copy = Embedder.load(teacher_dir, device="cpu", precision="fp32")
    stage = distill_stage(teacher_dir, tmp_path / "cache", steps=2, log_every=1)
    logged = train_on(data_dir, tmp_path / "copy", copy, stage)
    # the first step's loss, before any update (Adam then moves even a zero-loss student): 1 - cos 1 and KL(p ‖ p)
    assert logged[0]["loss_last"] < 1e-6
    other = tiny_embedder(seed=5)
    logged = train_on(data_dir, tmp_path / "other", other, distill_stage(teacher_dir, tmp_path / "cache", steps=20))
    first, last = logged[0]["loss"], logged[-1]["loss"]
    assert first > 0.05 and last < 0.7 * first  # a different student moves towards the teacher


def test_the_second_run_reads_every_teacher_embedding_from_the_cache(data_dir, tmp_path, teacher_dir):
    stage = distill_stage(teacher_dir, tmp_path / "cache")
    first = train_on(data_dir, tmp_path / "a", tiny_embedder(seed=5), stage, resume=False)
    assert first[-1]["teacher_embedded"] > 0
    second = train_on(data_dir, tmp_path / "b", tiny_embedder(seed=5), stage, resume=False)
    assert second[-1]["teacher_embedded"] == 0 and second[-1]["teacher_cached"] > 0
    assert [r["loss"] for r in second] == [r["loss"] for r in first]  # the same vectors, the same trajectory
    # another teacher is another cache folder: nothing is read across teachers
    other = tiny_embedder(seed=9).save(tmp_path / "t2")
    third = train_on(data_dir, tmp_path / "c", tiny_embedder(seed=5), distill_stage(other, tmp_path / "cache"))
    assert third[-1]["teacher_embedded"] == first[-1]["teacher_embedded"]  # all embedded afresh
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_wider_teacher_trains_a_projection_kept_in_checkpoints_and_resumed(data_dir, tmp_path, wide_teacher_dir):
    stage = distill_stage(wide_teacher_dir, tmp_path / "cache", contrastive_weight=1.0)
    straight = tiny_embedder(seed=5)
    logged = train_on(data_dir, tmp_path / "a", straight, stage)
    checkpoint = load_file(str(latest_checkpoint(tmp_path / "a" / "checkpoints") / "model.safetensors"))
    assert checkpoint[PROJECTION + "weight"].shape == (96, 64)

    interrupted = tiny_embedder(seed=5)
    with crash_in_step(7), pytest.raises(KeyboardInterrupt):
        train_on(data_dir, tmp_path / "b", interrupted, stage)
    resumed = tiny_embedder(seed=5)
    again = train_on(data_dir, tmp_path / "b", resumed, stage, resume=True)
    assert [r["loss"] for r in again if r["step"] > 5] == pytest.approx(
        [r["loss"] for r in logged if r["step"] > 5], rel=1e-5
    )
    for name, p in straight.named_parameters():
        torch.testing.assert_close(p, dict(resumed.named_parameters())[name], atol=1e-6, rtol=0)


def test_embforge_distill_writes_a_student_without_the_projection(data_dir, tmp_path, wide_teacher_dir):
    student = tiny_embedder(seed=5).save(tmp_path / "student")
    args = ["distill", str(student), "--teacher", str(wide_teacher_dir), "--data", str(data_dir / "memory.jsonl")]
    args += ["--output", str(tmp_path / "out"), "--steps", "4", "--batch-size", "4", "--max-seq-len", "32"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    final = Embedder.load(tmp_path / "out" / "final")
    assert final.encode(["a b c"]).shape == (1, 64)
    saved = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert not any("projection" in k for k in saved)


def test_distillation_settings_are_checked():
    with pytest.raises(ConfigError, match="both distillation terms are off"):
        stage_config(loss={"distill": {"teacher": "t", "embedding": "none", "kl_weight": 0}})
    with pytest.raises(ConfigError, match="0 leaves no loss"):
        stage_config(loss={"contrastive_weight": 0})
