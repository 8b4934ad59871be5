"""2 gloo processes vs 1 process on the same global batch: same loss and gradients.

Each rank holds half of the queries with their positives and hard negatives; documents
are gathered across ranks with gradient, and DDP averages the gradients.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embforge.train.loop import contrastive_step
from embforge.train.parallel import DistInfo, wrap_model
from embforge.train.recipe import LossConfig

from .helpers import grads, make_batch, records, tiny_embedder

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


def _worker(rank, world, init_file, out_file, case):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg, chunk = CASES[case]
        info = DistInfo(rank=rank, world=world)
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
        dist.barrier()  # no rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_rank(case, tmp_path):
    cfg, chunk = CASES[case]
    loss, expected = _single(cfg, chunk)
    init_file = tempfile.mktemp(dir=tmp_path)
    out = tmp_path / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, init_file, str(out), case), nprocs=2, join=True)
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
