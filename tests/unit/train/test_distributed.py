"""2 gloo processes vs 1 process on the same global batch: same loss and gradients.

Each rank holds half of the queries with their positives and hard negatives; documents
are gathered across ranks with gradient, and DDP averages the gradients. And leaving the
group really ends it: no gloo thread survives into interpreter shutdown.
"""

import json
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embforge.models.embedder import Embedder
from embforge.train.loop import contrastive_step
from embforge.train.parallel import DistInfo, barrier, distributed_session, init_distributed, shutdown, wrap_model
from embforge.train.recipe import LossConfig

from .helpers import free_port, gloo_threads, grads, make_batch, rank_env, records, tiny_embedder

GLOBAL_B, N = 6, 2
FLAGS = [True, True, False, True, True, True]
CASES = {
    "plain": (LossConfig(temperature=0.05), 0),
    "symmetric": (LossConfig(temperature=0.05, symmetric=True), 0),
    "gradcache+matryoshka": (LossConfig(temperature=0.05, matryoshka_dims=[64, 16]), 4),
}


def _single(cfg, chunk):
    model = tiny_embedder()
    model.train()
    batch = make_batch(model, records(GLOBAL_B, N), N, FLAGS)
    loss = contrastive_step(model, batch, cfg, DistInfo(), grad_cache_chunk=chunk)
    return loss.item(), grads(model)


def _worker(rank, world, port, out_file, case):
    rank_env(rank, world, port)
    with distributed_session() as info:  # the commands' own init and teardown
        cfg, chunk = CASES[case]
        model = tiny_embedder()
        model.train()
        per = GLOBAL_B // world
        recs = records(GLOBAL_B, N)[rank * per : (rank + 1) * per]
        batch = make_batch(model, recs, N, FLAGS[rank * per : (rank + 1) * per])
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
    Embedder(backbone, tokenizer, pooling="mean").save(folder)
    out = tmp_path / "rank"
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(folder), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["holds_weights"] and not r1["holds_weights"]  # rank 1 never read the weights: it built on meta
    assert r0["local"] + r1["local"] >= r0["full"] and max(r0["local"], r1["local"]) <= r0["full"] // 2 + 1024
    for r in (r0, r1):  # the shards, filled from rank 0, compute rank 0's full model
        assert torch.allclose(r["emb"], r0["reference"], atol=1e-5)
