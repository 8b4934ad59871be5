"""Checkpoints: kill -9 at any point then resume, damaged checkpoints, retention, safe loading, faults."""

import errno
import json
import multiprocessing
import os
import pickle
import random
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

import embforge.train.checkpoint as checkpoint
from embforge.atomic import MANIFEST, folder_problem, write_manifest
from embforge.errors import CheckpointError, SaveError
from embforge.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint

from . import kill_driver
from .helpers import crash_in_step, stage_config, tiny_embedder, train_on


def _train(model, stage, data_dir, out, resume=True, evaluator=None):
    return train_on(data_dir, out, model, stage, resume=resume, evaluator=evaluator)


def _visible_checkpoints_are_complete(ckpt_dir) -> list[str]:
    names = []
    for path in checkpoint.checkpoint_folders(ckpt_dir):
        assert folder_problem(path) is None, f"{path}: {folder_problem(path)}"
        names.append(path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint may be reported damaged
        latest_checkpoint(ckpt_dir)
    return names


def _assert_same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    """SIGKILL at seeded random moments (timed, and at fsyncs inside checkpoint writes and deletions),
    resume until done: same final weights (CPU fp32, 1e-6); no visible checkpoint is ever half-written."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([kill_driver.__name__])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # Python 3.11's fork server ignores our sys.path

    def run(out, die_at=0, kill_after=None) -> tuple[int, float]:
        """(exit code, seconds from the start of training to the end of the process)."""
        ready = ctx.Event()
        proc = ctx.Process(target=kill_driver.main, args=(data_dir, out, die_at, ready))
        proc.start()
        ready.wait(timeout=120)
        t0 = time.perf_counter()
        if kill_after is not None:
            proc.join(timeout=kill_after)
            proc.kill()
        proc.join(timeout=300)
        return proc.exitcode, time.perf_counter() - t0

    code, seconds = run(tmp_path / "straight")
    assert code == 0
    ckpts = tmp_path / "killed" / "checkpoints"
    rng = random.Random(20240607)
    # kills in a write first: they count fsyncs, so where they land does not depend on the machine's speed
    # (this seed: inside the 2nd checkpoint write of each run -- between two files, at the manifest, before
    # and after the rename); then timed kills, anywhere
    plan = [("in a write", rng.randint(2, 20)) for _ in range(4)] + [
        ("timed", rng.uniform(0, seconds / 3)) for _ in range(3)
    ]
    kills = []
    for kind, when in plan:
        code, _ = (
            run(tmp_path / "killed", die_at=when) if kind == "in a write" else run(tmp_path / "killed", kill_after=when)
        )
        if code == 0:  # a timed kill came after the end
            break
        assert code == -9, code
        kills.append(kind)
        _visible_checkpoints_are_complete(ckpts)
    assert kills[:4] == ["in a write"] * 4, kills
    if code != 0:
        assert run(tmp_path / "killed")[0] == 0
    final = f"step-{kill_driver.STEPS:08d}"
    assert _visible_checkpoints_are_complete(ckpts)[-1] == final
    _assert_same_weights(tmp_path / "straight" / "checkpoints" / final, ckpts / final)
    logged = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["step"] for r in reference] == list(range(2, 19, 2))
    # loss_last: the step's own loss (the window mean "loss" restarts at a resume)
    assert [r["loss_last"] for r in logged] == pytest.approx([r["loss_last"] for r in reference], abs=1e-6)


def _two_checkpoints(folder):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (10, 20):
        save_checkpoint(folder, step, model.state_dict(), optimizer.state_dict(), scheduler, {}, {"seed": 0})
    return optimizer, scheduler


DAMAGE = {
    "manifest.json is missing": lambda p: (p / MANIFEST).unlink(),
    "optimizer.pt: 7 bytes": lambda p: (p / "optimizer.pt").write_bytes(b"partial"),
    "rng.pt is missing": lambda p: (p / "rng.pt").unlink(),
    "model.safetensors: SHA-256 does not match": lambda p: _flip_last_byte(p / "model.safetensors"),
}


def _flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    _two_checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / "step-00000020")
    with pytest.warns(UserWarning, match=rf"step-00000020 is damaged \({damage}.*\); using the previous one"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"


def test_resume_past_a_damaged_checkpoint_equals_an_uninterrupted_run(data_dir, tmp_path):
    straight = tiny_embedder(dropout=0.1)
    _train(straight, stage_config(keep_last_checkpoints=0), data_dir, tmp_path / "a", resume=False)
    _train(tiny_embedder(dropout=0.1), stage_config(keep_last_checkpoints=0), data_dir, tmp_path / "b", resume=False)
    _flip_last_byte(tmp_path / "b" / "checkpoints" / "step-00000020" / "optimizer.pt")
    resumed = tiny_embedder(dropout=0.1, seed=7)
    with pytest.warns(UserWarning, match="step-00000020 is damaged"):
        _train(resumed, stage_config(keep_last_checkpoints=0), data_dir, tmp_path / "b")  # steps 11-20 again
    _assert_same_weights(
        tmp_path / "a" / "checkpoints" / "step-00000020", tmp_path / "b" / "checkpoints" / "step-00000020"
    )
    assert folder_problem(tmp_path / "b" / "checkpoints" / "step-00000020") is None  # replaced by a good one


def test_keeps_the_last_k_checkpoints_plus_the_best(data_dir, tmp_path):
    scores = iter([0.1, 0.9, 0.3, 0.2, 0.4, 0.5])  # evaluations at steps 2, 4, ..., 12: the best is step 4
    stage = stage_config(steps=12, save_every=2, eval_every=2, eval_tasks="unused", keep_last_checkpoints=2)
    _train(tiny_embedder(), stage, data_dir, tmp_path / "r", evaluator=lambda model: {"toy": next(scores)})
    ckpts = tmp_path / "r" / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_folders(ckpts)] == ["step-00000004", "step-00000010", "step-00000012"]
    assert checkpoint.best_checkpoint(ckpts, "eval/toy") == ckpts / "step-00000004"
    assert json.loads((ckpts / "step-00000004" / "trainer_state.json").read_text())["metrics"] == {"eval/toy": 0.9}
    assert [p.name for p in ckpts.iterdir()] == sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))


class _RunsCodeWhenLoaded:
    loaded = False

    def __reduce__(self):
        return (_mark_loaded, ())


def _mark_loaded():
    _RunsCodeWhenLoaded.loaded = True
    return {}


def test_training_state_is_loaded_with_weights_only(tmp_path):
    optimizer, scheduler = _two_checkpoints(tmp_path)
    path = tmp_path / "step-00000020"
    state = optimizer.state_dict()
    state["extra"] = _RunsCodeWhenLoaded()
    torch.save(state, path / "optimizer.pt")
    write_manifest(path)  # a consistent checkpoint whose pickle would run code
    with pytest.raises(CheckpointError, match=r"optimizer\.pt holds more than tensors.*weights_only=True"):
        load_training_state(path, optimizer.load_state_dict, scheduler)
    assert not _RunsCodeWhenLoaded.loaded
    load_training_state(tmp_path / "step-00000010", optimizer.load_state_dict, scheduler)  # RNG states included


def test_a_sharded_checkpoint_is_read_without_running_code(tmp_path):
    """The index (``.metadata``, read with plain pickle by torch.distributed.checkpoint) and the non-tensor
    values (optimizer hyper-parameters, read with torch.load(weights_only=False) by it) are refused when
    they name anything but tensors, plain values and the index's own classes."""
    import torch.distributed.checkpoint as dcp

    from embforge.train.checkpoint import load_model_weights
    from embforge.train.sharded_checkpoint import SHARDED, load_sharded_states

    saved, path = torch.nn.Linear(3, 2), tmp_path / "step-00000010"
    groups = [{"lr": 0.5, "extra": _RunsCodeWhenLoaded()}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {"model": saved.state_dict(), "optimizer": {"param_groups": groups}},
            storage_writer=dcp.FileSystemWriter(path / SHARDED),
            no_dist=True,
        )
    model = torch.nn.Linear(3, 2)
    load_model_weights(path, model)  # tensors only: read
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(CheckpointError, match="needs more than weights_only=True"):
        load_sharded_states(path, {"optimizer": {"param_groups": [{"lr": 0.0, "extra": None}]}}, no_dist=True)
    assert not _RunsCodeWhenLoaded.loaded
    (path / SHARDED / ".metadata").write_bytes(pickle.dumps(_RunsCodeWhenLoaded()))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused .*_mark_loaded is not allowed"):
        load_model_weights(path, model)
    assert not _RunsCodeWhenLoaded.loaded


def test_disk_full_during_a_checkpoint_save_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    optimizer, scheduler = _two_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-00000020").iterdir()}
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        with open(f, "ab") as partial:
            partial.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(SaveError, match=r"could not save .*step-00000030: the disk is full"):
        save_checkpoint(tmp_path, 30, model.state_dict(), optimizer.state_dict(), scheduler, {}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000020"]  # no leftovers
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000020").iterdir()} == before
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000020"


def test_an_unwritable_output_folder_fails_before_training(data_dir, tmp_path, unwritable):
    out = unwritable(tmp_path / "ro")
    with pytest.raises(SaveError, match=rf"could not save {out}/s/checkpoints: the folder is not writable"):
        _train(tiny_embedder(), stage_config(steps=2), data_dir, out / "s")


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_resume(data_dir, tmp_path):
    with crash_in_step(11), pytest.raises(KeyboardInterrupt):
        _train(tiny_embedder(), stage_config(), data_dir, tmp_path / "c", resume=False)
    with (tmp_path / "c" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 0.')  # killed mid-append
    history = _train(tiny_embedder(), stage_config(), data_dir, tmp_path / "c")
    assert [h["step"] for h in history] == [5, 10, 15, 20]
