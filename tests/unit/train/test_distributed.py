"""2 gloo processes vs 1 process on the same global batch: same loss and gradients.

Each rank holds half of the queries with their positives and hard negatives; documents
are gathered across ranks with gradient, and DDP averages the gradients. And leaving the
group really ends it: no gloo thread survives into interpreter shutdown.
"""

import contextlib
import json
import shutil
import time
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embforge.data.pairs import text_key
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.train import trainer
from embforge.train.checkpoint import checkpoint_folders
from embforge.train.contrastive import contrastive_step
from embforge.train.distill import TeacherBatch, make_projection
from embforge.train.parallel import (
    DistInfo,
    average_gradients,
    barrier,
    distributed_session,
    init_distributed,
    meta_copy,
    shutdown,
    wrap_model,
)
from embforge.train.recipe import DistillConfig, LossConfig

from .helpers import (
    crash_in_step,
    free_port,
    gloo_threads,
    grads,
    make_batch,
    rank_env,
    records,
    stage_config,
    tiny_embedder,
    train_on,
)

GLOBAL_B, N = 6, 2
FLAGS = [True, True, False, True, True, True]
CASES = {
    "plain": (LossConfig(temperature=0.05), 0),
    "symmetric": (LossConfig(temperature=0.05, symmetric=True), 0),
    "gradcache+matryoshka": (LossConfig(temperature=0.05, matryoshka_dims=[64, 16]), 4),
    "same-tower+margin+hardness+spread-out": (
        LossConfig(
            0.05,
            symmetric=True,
            same_tower=True,
            false_negative_margin=0.02,
            hardness_weighting=2.0,
            spread_out_weight=0.5,
        ),
        0,
    ),
}


# queries of dataset b (FLAGS false) with 1 negative beside a's 2: rank 0 holds [2, 2, 1], rank 1 [2, 2, 2]
MIXED = {
    "mixed negatives+symmetric+gradcache+matryoshka": (LossConfig(0.05, symmetric=True, matryoshka_dims=[64, 16]), 4)
}


def _single(cfg, chunk, b_negatives=None):
    model = tiny_embedder()
    model.train()
    batch = make_batch(model, records(GLOBAL_B, N), N, FLAGS, b_negatives=b_negatives)
    loss = contrastive_step(model, batch, cfg, DistInfo(), grad_cache_chunk=chunk)
    return loss.item(), grads(model)


def _worker(rank, world, port, out_file, case, b_negatives=None):
    rank_env(rank, world, port)
    with distributed_session() as info:  # the commands' own init and teardown
        cfg, chunk = {**CASES, **MIXED}[case]
        model = tiny_embedder()
        model.train()
        per = GLOBAL_B // world
        recs = records(GLOBAL_B, N)[rank * per : (rank + 1) * per]
        batch = make_batch(model, recs, N, FLAGS[rank * per : (rank + 1) * per], b_negatives=b_negatives)
        ddp = wrap_model(model, info, "ddp")
        loss = contrastive_step(ddp, batch, cfg, info, grad_cache_chunk=chunk)
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss.item() / world, "grads": grads(model)}, out_file)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_rank(case, tmp_path):
    cfg, chunk = CASES[case]
    loss, expected = _single(cfg, chunk)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), case), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    assert got["grads"].keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5), name


@pytest.mark.parametrize("case", list(MIXED))
def test_two_ranks_equal_one_rank_with_different_numbers_of_negatives(case, tmp_path):
    cfg, chunk = MIXED[case]
    loss, expected = _single(cfg, chunk, b_negatives=1)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), case, 1), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    assert got["grads"].keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5), name


def test_fsdp_blocks_are_found_by_structure_not_class_name():
    from embforge.train.parallel import transformer_blocks

    from .helpers import tiny_lora_embedder

    bert = tiny_embedder()
    assert transformer_blocks(bert) == list(bert.backbone.encoder.layer)
    decoder = tiny_lora_embedder()  # Llama blocks inside a peft wrapper, beside a latent head
    blocks = transformer_blocks(decoder)
    assert blocks == list(decoder.backbone.get_base_model().layers) and len(blocks) == 2


def _shutdown_worker(rank, world, port, model_dir, out_file):
    rank_env(rank, world, port)
    info = init_distributed()
    group = weakref.ref(dist.group.WORLD)
    model = Embedder.load(model_dir)  # loading through transformers (and DDP) imports torch._dynamo after init
    model.train()
    ddp = wrap_model(model, info, "ddp")
    batch = make_batch(model, records(2, N, seed=rank), N)
    contrastive_step(ddp, batch, LossConfig(temperature=0.05), info)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank})
    del ddp, batch
    barrier()
    shutdown()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"group_alive": group() is not None, "gloo_threads": gloo_threads()}, f)


def test_shutdown_leaves_no_process_group_behind(tiny_model_dir, tmp_path):
    """After shutdown() the group and its gloo threads are gone, so none can abort the process at exit."""
    out = tmp_path / "threads.json"
    mp.spawn(_shutdown_worker, args=(2, free_port(), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert got == {"group_alive": False, "gloo_threads": []}


def _fsdp_worker(rank, world, port, folder, out_file):
    rank_env(rank, world, port)
    from embforge.models.build import build_embedder
    from embforge.models.spec import LoraConfig, ModelConfig, PoolingConfig
    from embforge.train.parallel import build_device, holds_weights

    with distributed_session() as info:
        spec = ModelConfig(
            name_or_path=folder,
            attention="bidirectional",
            pooling=PoolingConfig(name="latent", num_latents=8, num_heads=2, head_dim=16),
            lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        )
        torch.manual_seed(0)  # rank 0's LoRA and head init is the one every rank gets
        embedder = build_embedder(spec, device=build_device(info, "fsdp"))
        sharded = wrap_model(embedder, info, "fsdp")
        local = sum(p.to_local().numel() for p in sharded.parameters())
        batch = embedder.tokenize(["a short text", "a somewhat longer text than the first one"])
        with torch.no_grad():
            emb = sharded(**batch)
        report = {"holds_weights": holds_weights(embedder), "local": local, "emb": emb}
        if rank == 0:
            report["full"] = sum(p.numel() for p in embedder.parameters())
            with torch.no_grad():
                report["reference"] = embedder(**batch)
        torch.save(report, f"{out_file}.{rank}")


def test_fsdp_ranks_materialise_only_their_own_shards(tmp_path):
    from embforge.models.tiny import tiny_decoder

    backbone, tokenizer = tiny_decoder("llama")
    folder = tmp_path / "decoder"
    Embedder(backbone, tokenizer, HeadSpec(pooling="mean")).save(folder)
    out = tmp_path / "rank"
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(folder), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["holds_weights"] and not r1["holds_weights"]  # rank 1 never read the weights: it built on meta
    assert r0["local"] + r1["local"] >= r0["full"] and max(r0["local"], r1["local"]) <= r0["full"] // 2 + 1024
    for r in (r0, r1):  # the shards, filled from rank 0, compute rank 0's full model
        assert torch.allclose(r["emb"], r0["reference"], atol=1e-5)


# ---------------------------------------------------------------------------- FSDP checkpoints and evaluation
FSDP_STEPS, FSDP_SAVE_EVERY = 8, 4


def _fsdp_stage(**over):
    return stage_config(steps=FSDP_STEPS, save_every=FSDP_SAVE_EVERY, log_every=2, keep_last_checkpoints=0, **over)


def _fsdp_train_worker(rank, world, port, data_dir, stage_dir, out_file, crash_in, watch_resume):
    """Train ``_fsdp_stage`` under FSDP (resuming from ``stage_dir``); rank 0 saves its final weights.

    ``crash_in``: stop both ranks in that step (after the middle checkpoint). ``watch_resume``: a load of
    a full optimizer state fails, and each rank records what its optimizer holds right after the resume.
    """
    rank_env(rank, world, port)

    loaded = {}
    if watch_resume:

        def no_full_optimizer_state(*args, **kwargs):
            raise AssertionError("a full optimizer state was loaded")

        def watched(path, states, **kwargs):
            real_load(path, states, **kwargs)
            for fqn, tensors in states["optimizer"]["state"].items():
                exp_avg = tensors["exp_avg"]
                loaded[fqn] = (type(exp_avg).__name__, exp_avg.to_local().numel(), exp_avg.numel())

        real_load = trainer.load_sharded_states
        trainer.load_sharded_states = watched
        trainer.optimizer_loader = no_full_optimizer_state
    with distributed_session() as info:
        embedder = tiny_embedder() if rank == 0 else meta_copy(tiny_embedder())  # as build_device does
        with crash_in_step(crash_in) if crash_in else contextlib.nullcontext(), contextlib.suppress(KeyboardInterrupt):
            train_on(data_dir, stage_dir, embedder, _fsdp_stage(), info=info, parallel="fsdp")
        torch.save({"weights": embedder.state_dict() if rank == 0 else {}, "loaded": loaded}, f"{out_file}.{rank}")


def _fsdp_run(tmp_path, data_dir, name, *, crash_in=0, watch_resume=False) -> list[dict]:
    out = tmp_path / f"{name}.pt"
    args = (2, free_port(), str(data_dir), str(tmp_path / name), str(out), crash_in, watch_resume)
    mp.spawn(_fsdp_train_worker, args=args, nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def test_fsdp_sharded_checkpoint_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    """2 FSDP ranks stop after the middle checkpoint and resume from it: the same final weights as an
    uninterrupted run (fp32, 1e-6). The checkpoint holds each rank's shards (torch.distributed.checkpoint),
    no full optimizer.pt, and each rank reads back only its own half of the optimizer state. The same
    checkpoint also resumes in one process (resharded), with twice the per-rank batch."""
    straight = _fsdp_run(tmp_path, data_dir, "straight")[0]["weights"]
    _fsdp_run(tmp_path, data_dir, "resumed", crash_in=FSDP_SAVE_EVERY + 2)
    ckpts = tmp_path / "resumed" / "checkpoints"
    middle = ckpts / f"step-{FSDP_SAVE_EVERY:08d}"
    assert [p.name for p in checkpoint_folders(ckpts)] == [middle.name]
    files = sorted(p.relative_to(middle).as_posix() for p in middle.rglob("*") if p.is_file())
    assert files == [
        "manifest.json",
        "recipe.yaml",
        "rng.pt",
        "sharded/.metadata",
        "sharded/__0_0.distcp",
        "sharded/__1_0.distcp",
        "trainer_state.json",
    ]
    assert set(json.loads((middle / "manifest.json").read_text())["files"]) == set(files) - {"manifest.json"}
    single = tmp_path / "single"  # a copy of the stopped run, resumed below in one process
    shutil.copytree(tmp_path / "resumed", single)

    ranks = _fsdp_run(tmp_path, data_dir, "resumed", watch_resume=True)
    for name, w in straight.items():
        assert torch.allclose(ranks[0]["weights"][name], w, atol=1e-6, rtol=0), name
    assert ranks[0]["loaded"].keys() == ranks[1]["loaded"].keys() and ranks[0]["loaded"]
    for fqn, (kind, local, total) in ranks[0]["loaded"].items():
        assert kind == "DTensor" and ranks[1]["loaded"][fqn][0] == "DTensor", fqn
        assert local + ranks[1]["loaded"][fqn][1] == total and max(local, ranks[1]["loaded"][fqn][1]) <= total // 2 + 64
    one = tiny_embedder(seed=9)  # the checkpoint's weights replace these
    stage = _fsdp_stage()
    stage.data.batch_size *= 2  # the same global batch on one rank
    train_on(data_dir, single, one, stage, parallel="fsdp")
    trained = {k: v for k, v in one.state_dict().items() if k in straight and "pooler" not in k}
    for name, w in trained.items():  # one process sums in another order: test_torchrun's tolerance
        assert torch.allclose(w, straight[name], atol=1e-4), name


EVAL_SLEEP_S, GROUP_TIMEOUT_S = 8.0, 4.0


def _score(model) -> dict[str, float]:
    return {"norm": float(np.linalg.norm(model.encode(["a short text"])[0, :8]))}


def _slow_eval_worker(rank, world, port, data_dir, stage_dir, parallel, out_file):
    """Rank 0 evaluates for twice the process group's timeout while rank 1 waits for it."""
    rank_env(rank, world, port)

    def slow_evaluator(model):
        time.sleep(EVAL_SLEEP_S)
        return _score(model)

    with distributed_session(timeout_s=GROUP_TIMEOUT_S) as info:
        embedder = tiny_embedder() if rank == 0 or parallel == "ddp" else meta_copy(tiny_embedder())
        stage = stage_config(steps=4, save_every=0, log_every=2, eval_every=4, eval_tasks="unused")
        history = train_on(data_dir, stage_dir, embedder, stage, info=info, parallel=parallel, evaluator=slow_evaluator)
        if rank == 0:  # rank 0's model now holds the final weights: the evaluation must have seen them
            torch.save({"history": history, "final": _score(embedder)}, out_file)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_long_evaluation_on_rank_0_does_not_time_out_the_other_ranks(data_dir, tmp_path, parallel):
    """The process group times out after 4 s; rank 0 evaluates for 8 s: the run completes, with the scores
    logged. Under FSDP the shards are gathered into rank 0's model for it (the scores are the final model's)."""
    out = tmp_path / "eval.pt"
    args = (2, free_port(), str(data_dir), str(tmp_path / "run"), parallel, str(out))
    mp.spawn(_slow_eval_worker, args=args, nprocs=2, join=True)
    got = torch.load(out)
    assert [row["step"] for row in got["history"]] == [2, 4]
    assert got["history"][-1]["eval/norm"] == pytest.approx(got["final"]["norm"], abs=1e-6)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["metrics"] == {
        "eval/norm": pytest.approx(got["final"]["norm"])
    }


# distillation beside InfoNCE (weight 0.5), a wider teacher (the projection trains outside DDP), GradCache
DISTILL = LossConfig(0.05, contrastive_weight=0.5, distill=DistillConfig(teacher="(fixed vectors)"))


def _teacher_of(recs) -> TeacherBatch:
    """A teacher whose vector is a fixed function of each text (96-d), so every process sees the same one."""

    def vec(text):
        g = torch.Generator().manual_seed(text_key(text) % 2**31)
        return torch.nn.functional.normalize(torch.randn(96, generator=g), dim=0)

    docs = [r.positive for r in recs] + [n for r in recs for n in r.negatives[:N]]
    return TeacherBatch(torch.stack([vec(r.query) for r in recs]), torch.stack([vec(d) for d in docs]))


def _distill_worker(rank, world, port, out_file):
    rank_env(rank, world, port)
    with distributed_session() as info:
        model, projection = tiny_embedder(), make_projection(64, 96, DISTILL.distill)
        model.train()
        per = GLOBAL_B // world
        recs = records(GLOBAL_B, N)[rank * per : (rank + 1) * per]
        batch = make_batch(model, recs, N, FLAGS[rank * per : (rank + 1) * per])
        batch.teacher = _teacher_of(recs)
        ddp = wrap_model(model, info, "ddp")
        loss = contrastive_step(ddp, batch, DISTILL, info, grad_cache_chunk=4, projection=projection)
        average_gradients(list(projection.parameters()), info)
        dist.all_reduce(loss)
        if rank == 0:
            out = {"loss": loss.item() / world, "grads": grads(model), "projection": projection.weight.grad}
            torch.save(out, out_file)


def test_two_ranks_equal_one_rank_with_distillation(tmp_path):
    model, projection = tiny_embedder(), make_projection(64, 96, DISTILL.distill)
    model.train()
    recs = records(GLOBAL_B, N)
    batch = make_batch(model, recs, N, FLAGS)
    batch.teacher = _teacher_of(recs)
    loss = contrastive_step(model, batch, DISTILL, DistInfo(), grad_cache_chunk=4, projection=projection).item()
    out = tmp_path / "rank0.pt"
    mp.spawn(_distill_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(got["projection"], projection.weight.grad, atol=1e-6, rtol=0)
    expected = grads(model)
    assert got["grads"].keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5), name
