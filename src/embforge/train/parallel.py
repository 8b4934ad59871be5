"""Process groups and model wrapping for torchrun (DDP, FSDP). The model never imports this.

The same code path runs on 1 CPU process and on N GPUs: :func:`init_distributed` reads
torchrun's environment (nothing to do without it), picks nccl on GPUs and gloo on CPU,
and :func:`wrap_model` applies DDP or FSDP to an already-built model. Commands run inside
:func:`distributed_session`, which also takes the group down cleanly (see :func:`shutdown`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib
import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# torch modules that bind the default group at import time (``def all_gather(tensor, group=group.WORLD)``).
# Imported after init_process_group -- transformers (loading a model) and DDP import them lazily
# through torch._dynamo -- they hold the live group in their default arguments, so
# destroy_process_group cannot free it: its gloo threads live on into interpreter shutdown, where
# a gloo thread dropping the last reference to a Python-owned tensor takes the GIL of a finalising
# interpreter and the process aborts ("terminate called without an active exception", SIGABRT)
# after its work is done. Imported before any group exists, they bind None instead.
_BIND_WORLD_AT_IMPORT = (
    "torch.distributed.nn",
    "torch.distributed.optim",
    "torch.distributed.fsdp",
    "torch._dynamo",  # imports further torch.distributed modules; transformers and DDP import it anyway
)


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun set up, or return a single-process DistInfo.

    Args:
        timeout_s: how long a collective of the group may wait for the other ranks (None: torch's
            default, 10 min for nccl, 30 min for gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for module in _BIND_WORLD_AT_IMPORT:
            importlib.import_module(module)
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


@contextlib.contextmanager
def distributed_session(timeout_s: float | None = None) -> Iterator[DistInfo]:
    """``init_distributed(timeout_s)`` for the body, then leave the group: what every multi-rank command runs in.

    On success every rank first meets at a barrier, so no rank tears its group down while another
    still has a collective in flight with it. After an error there is no barrier (the other ranks
    may never reach it): the group is destroyed at once and torchrun stops the rest.
    """
    info = init_distributed(timeout_s)
    try:
        yield info
        barrier()
    finally:
        shutdown()


def build_device(info: DistInfo, mode: str) -> torch.device:
    """Where a rank builds the model before :func:`wrap_model`.

    Under FSDP, rank 0 builds it in host memory (it holds the one full copy, which gets the
    trained weights back and is saved) and every other rank on ``meta`` (no weights read, no
    memory); :func:`wrap_model` then gives each rank its own shards only.
    """
    if mode == "fsdp" and info.world > 1:
        return torch.device("cpu") if info.is_main else torch.device("meta")
    return info.device


def holds_weights(model: torch.nn.Module) -> bool:
    """False for a model built on ``meta`` (an FSDP rank other than 0, see :func:`build_device`)."""
    return not any(p.is_meta for p in model.parameters())


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` on the ``meta`` device: no tensor data is copied."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            torch.nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else twin
        )
    return copy.deepcopy(model, memo)


def wrap_model(model: torch.nn.Module, info: DistInfo, mode: str = "ddp") -> torch.nn.Module:
    """DDP (default) or FSDP over an already-built model.

    FSDP shards a meta copy (``fully_shard`` on every transformer block, found by structure,
    then the root), materialises on each rank only that rank's shards (``to_empty``), and
    fills them from rank 0's full model by broadcast: no rank ever holds a full copy on its
    device, and ranks other than 0 never hold one at all (they built ``model`` on meta, see
    :func:`build_device`). Rank 0's ``model`` stays an ordinary module in host memory, which
    receives the trained weights from the final checkpoint and is what gets saved.
    """
    if info.world == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        sharded = meta_copy(model)
        for block in transformer_blocks(sharded):
            fully_shard(block)
        fully_shard(sharded)
        sharded.to_empty(device=info.device)  # this rank's shards only, uninitialised
        full = model.state_dict() if info.is_main else {}
        set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        host_buffers = dict(model.named_buffers()) if info.is_main else {}
        for name, buffer in sharded.named_buffers():  # buffers are not sharded: rank 0's values, e.g. rotary tables
            if info.is_main:
                buffer.copy_(host_buffers[name])
            dist.broadcast(buffer, src=0)
        return sharded
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a model, found by structure: the items of the ``nn.ModuleList`` whose
    items all share one type and that holds the most parameters (BERT's ``encoder.layer``,
    Llama's ``layers``, ...), whatever the blocks' class names."""
    best, best_size = [], 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def is_fsdp(model: torch.nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")


def full_model_state(model: torch.nn.Module) -> dict:
    """The unsharded trainable tensors of the model (frozen ones never change; buffers are left out).

    Under FSDP a collective (call it on every rank): the shards are gathered into host memory on
    rank 0, and the other ranks get ``{}``. Otherwise the (DDP-unwrapped) model's own tensors.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = (model.module if hasattr(model, "module") else model).state_dict()
    keep = trainable_names(model)
    return {k: v for k, v in state.items() if k in keep}


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the parameters that train (with LoRA: the adapters and the head, not the base)."""
    inner = model.module if hasattr(model, "module") else model
    return {name for name, p in inner.named_parameters() if p.requires_grad}


def sharded_states(model: torch.nn.Module, optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}`` as this rank holds them, for ``torch.distributed.checkpoint``.

    Under FSDP the values are DTensors over this rank's shards only (nothing is gathered);
    unsharded (one process, DDP) they are the full tensors. Keys are parameter names, whatever
    the wrapping, so a checkpoint written by N ranks loads on M. Only trainable parameters:
    the optimizer holds no others, and the frozen ones never change.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # sharded, not full: no gather
    keep = trainable_names(model)
    return {"model": {k: v for k, v in model_state.items() if k in keep}, "optimizer": optim_state}


def set_sharded_states(model: torch.nn.Module, optimizer, states: dict) -> None:
    """Load what :func:`sharded_states` returned (after ``torch.distributed.checkpoint`` filled it) into the
    wrapped model and its optimizer; frozen parameters keep their values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=states["model"],
        optim_state_dict=states["optimizer"],
        options=StateDictOptions(strict=False),  # frozen weights are not in the checkpoint
    )


def optimizer_loader(model: torch.nn.Module, optimizer):
    """A function that loads a full optimizer state dict into ``optimizer`` (sharded or not)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        return lambda state: set_optimizer_state_dict(
            model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
    return optimizer.load_state_dict


def no_sync(model: torch.nn.Module):
    """The model's gradient-sync suspension (DDP), or a no-op context."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def average_gradients(params, info: DistInfo) -> None:
    """All-reduce the gradients of parameters trained outside the DDP-wrapped model, as DDP does its own:
    each rank's gradient of its own loss becomes the mean over ranks."""
    for p in params if info.world > 1 else ():
        dist.all_reduce(p.grad)
        p.grad.div_(info.world)


def barrier(group=None) -> None:
    """Wait for every rank (on ``group``, default: the whole world); no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def patient_group(timeout_s: float):
    """A gloo group over every rank whose collectives wait up to ``timeout_s`` (None without a process group).

    For the ranks that wait while rank 0 works alone (evaluates): on the default group they would
    give up after its timeout (10 min for nccl, 30 for gloo) and take the run down. A collective
    call: every rank creates it, in the same order; :func:`shutdown` destroys it with the rest.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _drop_dtensor_caches() -> None:
    """Empty DTensor's (FSDP2's) memo caches: their keys hold device meshes, and a mesh holds its group.

    Every ``functools`` cache of the loaded ``torch.distributed.tensor`` modules (module level and
    on their classes), the sharding-propagation caches (Python and C++) and the planner cache.
    They only save recomputation, so emptying them at shutdown costs nothing.
    """
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("torch.distributed.tensor") and m]
    if not modules:
        return  # DTensor never used: nothing cached
    lru_cache_type = type(functools.lru_cache()(len))
    for module in modules:
        for obj in list(vars(module).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) and obj.__module__ == module.__name__ else [obj]
            for member in members:
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, lru_cache_type):
                    member.cache_clear()
    with contextlib.suppress(ImportError):  # private helpers: absent in other torch versions
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
        clear_redistribute_planner_cache()


def shutdown() -> None:
    """Destroy the process group now, while the interpreter is fully alive; no-op without one.

    Destroying the last reference joins gloo's worker threads, so none of them is left to touch
    Python objects during interpreter shutdown (see ``_BIND_WORLD_AT_IMPORT``). Warns, naming
    what holds it, when something else keeps the group (and so its threads) alive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = weakref.ref(dist.group.WORLD)
    _drop_dtensor_caches()
    dist.destroy_process_group()
    gc.collect()  # reference cycles (modules with hooks) may hold the group
    if group() is not None:
        holders = [type(r).__name__ for r in gc.get_referrers(group())]
        warnings.warn(
            f"the default process group outlived destroy_process_group (held by {holders or 'C++ or function defaults'}); "
            "its gloo threads may abort the process at exit",
            RuntimeWarning,
            stacklevel=2,
        )
