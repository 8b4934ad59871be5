"""THE training loop: one stage of contrastive training, from 1 CPU process to N GPUs.

Per optimizer step, for each of ``grad_accum_steps`` micro-steps: every rank draws the
same *global* batch from an identically seeded sampler and keeps its slice (so a run on
R processes sees exactly the batches of a 1-process run with R× the batch), tokenises
it, embeds queries and documents (plainly or with GradCache), and backpropagates an
InfoNCE loss whose documents are gathered from all ranks. Then: clip, AdamW step, LR
schedule, log, evaluate, checkpoint. A non-finite loss or gradient stops the run before
the optimizer touches the weights, so the last checkpoint stays the last good state (or,
with ``on_nonfinite: skip``, the step is dropped and counted).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from embforge.data.examples import classification_records, read_sts, sts_records
from embforge.data.pairs import (
    BatchSampler,
    Example,
    MemorySource,
    StreamSource,
    load_beir_pairs,
    load_jsonl_records,
    text_key,
)
from embforge.data.records import DataReport
from embforge.errors import CheckpointError, ConfigError, DataError, EmbforgeError
from embforge.losses import (
    contrastive_layout,
    document_candidates,
    document_slots,
    gather_no_grad,
    gather_with_grad,
    info_nce,
    matryoshka,
    pad_documents,
    spread_out,
)
from embforge.precision import autocast as precision_autocast
from embforge.precision import resolve_precision
from embforge.train.checkpoint import (
    is_sharded,
    latest_checkpoint,
    load_model_weights,
    load_sharded_states,
    load_stage_only,
    load_training_state,
    prune_checkpoints,
    ready_checkpoint_dir,
    resume_log,
    resume_point,
    save_checkpoint,
    save_sharded_checkpoint,
)
from embforge.train.distill import PROJECTION, Teacher, TeacherBatch, check_supported, distill_loss, make_projection
from embforge.train.dropout import use_fast_dropout
from embforge.train.grad_cache import grad_cache_step, split_features
from embforge.train.host_memory import keep_freed_memory
from embforge.train.parallel import (
    DistInfo,
    average_gradients,
    barrier,
    full_model_state,
    holds_weights,
    is_fsdp,
    no_sync,
    optimizer_loader,
    patient_group,
    set_sharded_states,
    sharded_states,
    wrap_model,
)
from embforge.train.prefetch import Prefetcher
from embforge.train.recipe import (
    DEFAULT_SHUFFLE_BUFFER,
    DataConfig,
    DatasetConfig,
    LossConfig,
    OptimConfig,
    StageConfig,
)
from embforge.train.schedule import HEAD_GROUP, build_scheduler
from embforge.train.sts_mining import StsMiner


class TrainingError(EmbforgeError):
    """Training cannot continue (e.g. the loss became NaN or infinite)."""


# ---------------------------------------------------------------------------- data
def build_sampler(
    data: DataConfig,
    data_root: Path,
    seed: int,
    world: int,
    *,
    in_batch_negatives: bool = True,
    rank: int = 0,
    mine_sts=None,
) -> tuple[BatchSampler, DataReport]:
    """Sources for every dataset of the stage, combined by the configured sampler.

    ``mine_sts``: ``(dataset config, StsPairs, report, num_negatives) -> records`` for STS datasets
    with ``negatives: mined`` (:class:`~embforge.train.sts_mining.StsMiner`); such a dataset without it is an error.

    ``rank_reading: global``: the sampler draws global batches (``batch_size · world``), the
    same on every rank. ``own_share`` (world > 1): rank ``rank`` reads only its share of each
    dataset (JSONL files and streams: every ``world``-th line, the others left unparsed; task
    files, which are small, are read whole and their examples dealt out alike) and draws
    batches of ``batch_size``; the dataset choices use the common ``seed``, so every rank
    picks the same datasets for a batch.

    ``no_duplicates`` only matters where a query is scored against other examples' documents:
    with the stage's in-batch negatives off (or every dataset's), a batch may repeat a text
    (e.g. the two label texts of a binary classification set), since no query sees another's.
    """
    report = DataReport()
    sources = []
    share = (rank, world) if data.reads_own_share(world) else None
    # task files are read whole on every rank: only rank 0 counts them, so the summed counts are the file's
    whole_file_report = DataReport() if share is not None and rank > 0 else report

    def memory(records, i, shared=False):  # shared: ``records`` is already this rank's share
        if share is not None and not shared:
            records = records[rank::world]
        ds = data.datasets[i]
        return MemorySource(records, seed + i, ds.name, data.negatives_of(ds), data.negative_sampling)

    for i, ds in enumerate(data.datasets):
        path = data_root / ds.path
        fields = ds.fields or {}
        num_negatives = data.negatives_of(ds)
        if ds.format == "beir":
            if num_negatives:
                raise DataError(f"dataset {ds.name!r}: BEIR pairs carry no hard negatives; mine them first")
            sources.append(memory(load_beir_pairs(path, ds.split, ds.name, whole_file_report), i))
        elif ds.format in ("classification", "clustering"):
            records = classification_records(
                path,
                ds.name,
                num_negatives=num_negatives,
                seed=seed + i,
                report=whole_file_report,
                text_field=fields.get("text", "text"),
                label_field=fields.get("label", "label"),
                label_texts=ds.label_texts,
            )
            sources.append(memory(records, i))
        elif ds.format == "sts" and ds.negatives == "mined":
            if mine_sts is None:
                raise DataError(f"dataset {ds.name!r}: negatives: mined needs a teacher (train_stage gives one)")
            keys = tuple(fields.get(k, k) for k in ("sentence1", "sentence2", "score"))
            sts = read_sts(path, ds.name, report=whole_file_report, min_score=ds.min_score, fields=keys)
            sources.append(memory(mine_sts(ds, sts, whole_file_report, num_negatives), i))
        elif ds.format == "sts":
            keys = tuple(fields.get(k, k) for k in ("sentence1", "sentence2", "score"))
            records = sts_records(
                path,
                ds.name,
                num_negatives=num_negatives,
                seed=seed + i,
                report=whole_file_report,
                min_score=ds.min_score,
                fields=keys,
            )
            sources.append(memory(records, i))
        elif ds.stream:
            if fields:
                raise DataError(f"dataset {ds.name!r}: fields renaming applies to in-memory JSONL, not streamed shards")
            sources.append(
                StreamSource(
                    str(path),
                    ds.name,
                    num_negatives,
                    report,
                    seed + i,
                    data.on_bad_record,
                    shuffle_buffer=DEFAULT_SHUFFLE_BUFFER if ds.shuffle_buffer is None else ds.shuffle_buffer,
                    negative_sampling=data.negative_sampling,
                    share=share or (0, 1),
                )
            )
        else:
            if not path.is_file():
                raise DataError(f"dataset {ds.name!r}: file not found: {path}")
            records = load_jsonl_records(path, ds.name, num_negatives, report, fields, data.on_bad_record, share)
            sources.append(memory(records, i, shared=True))
    sampler = BatchSampler(
        sources,
        [d.weight for d in data.datasets],
        data.batch_size * (1 if share else world),
        data.sampler,
        data.no_duplicates and in_batch_negatives and any(d.in_batch_negatives for d in data.datasets),
        seed,
    )
    return sampler, report


@dataclass
class ContrastiveBatch:
    queries: dict[str, torch.Tensor]  # tokenised (B, Tq)
    # tokenised (B + ΣN_i, Td): positives (this epoch's), then each query's negatives in turn
    # (row-major (B·(1+N), Td) when every query has N)
    docs: dict[str, torch.Tensor]
    query_keys: torch.Tensor  # (B,) text ids
    doc_keys: torch.Tensor  # (B + ΣN_i,) text ids
    in_batch: torch.Tensor  # (B,) per-query in-batch-negatives flag
    num_negatives: int  # N: every query's negatives, or the stage's most when its datasets differ
    # (B,) each query's negatives where the stage's datasets differ in num_negatives (the same on every
    # rank: it decides whether the loss pads, see embforge.losses); None: every query has N
    negative_counts: torch.Tensor | None = None
    teacher: TeacherBatch | None = None  # the teacher's embeddings of the same texts (loss.distill)


def _prompt(ds: DatasetConfig, instruction: str | None, instruction_prompt) -> str:
    if instruction is None:
        return ds.query_prompt
    prompt = instruction_prompt(instruction) if instruction_prompt is not None else None
    if prompt is None:
        raise DataError(
            f"dataset {ds.name!r} has an instruction ({instruction!r:.60}), but the model has no "
            "instruction_template; set model.instruction_template or use query_prompt"
        )
    return prompt


def query_prompt(example: Example, data: DataConfig, instruction_prompt=None) -> str:
    """The example's query prompt: its record's instruction, else its dataset's, through the model's
    template (``instruction_prompt``, i.e. :meth:`Embedder.instruction_prompt`); else the dataset's
    ``query_prompt``."""
    ds = data.datasets[example.dataset]
    instruction = example.record.instruction if example.record.instruction is not None else ds.instruction
    return _prompt(ds, instruction, instruction_prompt)


def document_prompt(example: Example, data: DataConfig, instruction_prompt=None) -> str:
    """The prompt of the example's positive and negatives: its query's with ``instruction_on_documents``
    (symmetric tasks: the same templated instruction on both sides), else the dataset's ``document_prompt``."""
    ds = data.datasets[example.dataset]
    return query_prompt(example, data, instruction_prompt) if ds.instruction_on_documents else ds.document_prompt


def collate(
    examples: list[Example],
    data: DataConfig,
    tokenize,
    device: torch.device,
    instruction_prompt=None,
    teacher: Teacher | None = None,
) -> ContrastiveBatch:
    """Prompt, tokenise and lay out a batch (see :mod:`embforge.losses` for the layout).

    Args:
        tokenize: ``(texts, prompts) -> features``, i.e. :meth:`Embedder.tokenize` with one prompt per text.
        instruction_prompt: ``instruction -> query prompt`` (see :func:`query_prompt`).
        teacher: embeds the same texts with the teacher's own prompts (``loss.distill``).
    """
    cfgs = [data.datasets[e.dataset] for e in examples]
    queries = [e.record.query for e in examples]
    q_prompts = [query_prompt(e, data, instruction_prompt) for e in examples]
    docs = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
    d_prompts = [document_prompt(e, data, instruction_prompt) for e in examples]
    doc_prompts = d_prompts + [p for p, e in zip(d_prompts, examples) for _ in e.negatives]
    counts = [len(e.negatives) for e in examples]
    return ContrastiveBatch(
        queries={k: v.to(device) for k, v in tokenize(queries, q_prompts).items()},
        docs={k: v.to(device) for k, v in tokenize(docs, doc_prompts).items()},
        query_keys=torch.tensor([text_key(q) for q in queries], device=device),
        doc_keys=torch.tensor([text_key(t) for t in docs], device=device),
        in_batch=torch.tensor([c.in_batch_negatives for c in cfgs], device=device),
        num_negatives=data.max_negatives,
        negative_counts=torch.tensor(counts, device=device) if data.mixed_negatives else None,
        teacher=teacher.embed_batch(queries, docs, device) if teacher is not None else None,
    )


# ---------------------------------------------------------------------------- loss
def make_loss_fn(batch: ContrastiveBatch, cfg: LossConfig, info: DistInfo, projection=None):
    """``(queries (B, D), docs (B + ΣN_i, D)) -> loss`` with padding, gather, masking and Matryoshka.

    The loss: ``contrastive_weight`` × (InfoNCE + spread-out, over the Matryoshka dims), plus the
    distillation terms at the full dimension where the stage has a teacher (``projection``: its
    D_s -> D_t map, see :mod:`embforge.train.distill`).
    """
    B, N = batch.query_keys.shape[0], batch.num_negatives
    keys = batch.doc_keys
    if batch.negative_counts is None:
        layout, slots = contrastive_layout(B, N, info.rank, info.world), None
    else:  # queries differ in N: each rank's documents are padded to N slots a query (see embforge.losses)
        counts = gather_no_grad(batch.negative_counts)  # (R·B,)
        layout = contrastive_layout(B, N, info.rank, info.world, negative_counts=counts)
        slots = document_slots(batch.negative_counts, N)  # (B + ΣN_i,)
        keys = pad_documents(keys, slots, B * (1 + N), fill=-1)  # text ids are >= 0: a pad matches none
    doc_keys = gather_no_grad(keys) if cfg.mask_duplicates else None
    in_batch = batch.in_batch & cfg.in_batch_negatives
    teacher = batch.teacher.laid_out(slots, B * (1 + N)) if cfg.distill is not None else None

    def loss_fn(q: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
        d = compact if slots is None else pad_documents(compact, slots, B * (1 + N))  # zero rows at padding slots
        docs = gather_with_grad(d)  # (R·B·(1+N), D)
        total = q.new_zeros(())
        if teacher is not None:
            allowed = document_candidates(B, docs.shape[0], layout, in_batch, doc_keys, docs.device)
            total = distill_loss(
                q,
                compact,
                docs,
                teacher,
                allowed,
                cfg=cfg.distill,
                temperature=cfg.temperature,
                projection=projection,
            )
        if not cfg.contrastive_weight:
            return total
        all_q = gather_with_grad(q) if cfg.symmetric or cfg.same_tower else None  # (R·B, D)
        pairs = None  # the spread-out term's non-matching pairs: one mask for every Matryoshka truncation
        if cfg.spread_out_weight:
            pairs = document_candidates(B, docs.shape[0], layout, in_batch, doc_keys, docs.device)
            pairs[torch.arange(B), layout.positive.to(docs.device)] = False

        def nce(qq, dd, aq):
            loss = info_nce(
                qq,
                dd,
                layout,
                temperature=cfg.temperature,
                in_batch_negatives=in_batch,
                doc_keys=doc_keys,
                query_keys=batch.query_keys,
                all_queries=aq,
                query_offset=info.rank * B,
                symmetric=cfg.symmetric,
                same_tower=cfg.same_tower,
                false_negative_margin=cfg.false_negative_margin,
                hardness=cfg.hardness_weighting,
            )
            if cfg.spread_out_weight:
                loss = loss + cfg.spread_out_weight * spread_out(qq, dd, pairs)
            return loss

        dims = cfg.matryoshka_dims or [q.shape[-1]]
        return total + cfg.contrastive_weight * matryoshka(nce, (q, docs, all_q), dims, cfg.matryoshka_weights)

    return loss_fn


def contrastive_step(
    model: torch.nn.Module,
    batch: ContrastiveBatch,
    cfg: LossConfig,
    info: DistInfo,
    *,
    grad_cache_chunk: int = 0,
    scale: float = 1.0,
    sync: bool = True,
    autocast=contextlib.nullcontext,
    projection: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Forward + backward of one (micro-)batch; gradients accumulate into ``.grad``.

    Args:
        model: the Embedder, possibly DDP-wrapped.
        scale: multiplies the loss (1 / grad_accum_steps).
        sync: let DDP all-reduce gradients on this backward (false for all but the last micro-step).
        projection: the distillation's D_s -> D_t map, outside the model (its gradients are this rank's).

    Returns:
        The unscaled loss of this rank (detached).
    """
    loss_fn = make_loss_fn(batch, cfg, info, projection)

    def embed(features):
        with autocast():
            return model(**features).float()

    def scaled(*emb):
        return loss_fn(*emb) * scale

    if grad_cache_chunk:
        inputs = [split_features(batch.queries, grad_cache_chunk), split_features(batch.docs, grad_cache_chunk)]
        with contextlib.nullcontext() if sync else no_sync(model):
            # within the step, only the last re-forward lets DDP all-reduce the gradients
            loss = grad_cache_step(embed, inputs, scaled, no_sync=lambda: no_sync(model))
        return loss / scale
    with contextlib.nullcontext() if sync else no_sync(model):
        loss = scaled(embed(batch.queries), embed(batch.docs))
        loss.backward()
    return loss.detach() / scale


# ---------------------------------------------------------------------------- optimizer
def head_parameters(model: torch.nn.Module) -> set[int]:
    """``id`` of every parameter of the Embedder's pooling head (``pooler``), found through a DDP
    wrapper (``.module``); FSDP shards a copy of the Embedder, whose ``pooler`` holds its shards.
    Empty for a model without one (e.g. an MLM model)."""
    pooler = getattr(getattr(model, "module", model), "pooler", None)
    return {id(p) for p in pooler.parameters()} if isinstance(pooler, torch.nn.Module) else set()


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, extra: list[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights get no weight decay.

    ``extra``: parameters trained beside the model (the distillation projection), decayed like weights.

    With ``head_lr`` or ``head_warmup_steps`` the pooling head's parameters (see
    :func:`head_parameters`) form groups of their own, named ``HEAD_GROUP``, at ``head_lr``;
    :func:`~embforge.train.schedule.build_scheduler` gives them their warm-up.

    The fused kernel (one pass over all parameters, same update rule) where every parameter
    is a floating-point CPU or CUDA tensor: measured several times faster than the default
    per-tensor loop on CPU for MiniLM's 22.7 M parameters (the transformers Trainer also
    defaults to it).
    """
    head = head_parameters(model) if cfg.separate_head else set()
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim < 2 or "norm" in name.lower()
        if id(p) in head:
            (head_no_decay if no_wd else head_decay).append(p)
        else:
            (no_decay if no_wd else decay).append(p)
    if cfg.separate_head and not head_decay + head_no_decay:
        raise ConfigError(
            "optim.head_lr / head_warmup_steps: the model has no trainable pooling-head parameters "
            "(a parameter-free pooling such as mean, or no Embedder)"
        )
    decay = decay + list(extra)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.separate_head:
        head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
        groups += [
            {"params": ps, "weight_decay": wd, "lr": head_lr, "name": HEAD_GROUP}
            for ps, wd in ((head_decay, cfg.weight_decay), (head_no_decay, 0.0))
            if ps
        ]
    params = decay + no_decay + head_decay + head_no_decay
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


# ---------------------------------------------------------------------------- the loop
def _sum_over_ranks(x: torch.Tensor, info: DistInfo) -> float:
    if info.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return float(x)


def _mean_over_ranks(x: torch.Tensor, info: DistInfo) -> float:
    return _sum_over_ranks(x, info) / info.world


def _gather(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (a collective)."""
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _merged(report: DataReport, info: DistInfo) -> DataReport:
    """The data counts of every rank added up (a collective)."""
    total = DataReport()
    for other in _gather(report, info):
        total.merge(other)
    return total


def _rank_sampler_state(saved, own_share: bool, info: DistInfo, checkpoint: Path) -> dict:
    """This rank's sampler state in a checkpoint's: the common one, or (own_share) its own of the list."""
    if own_share != isinstance(saved, list) or (own_share and len(saved) != info.world):
        written = f"own_share with {len(saved)} ranks" if isinstance(saved, list) else "global"
        now = f"own_share with {info.world} ranks" if own_share else "global"
        raise CheckpointError(
            f"{checkpoint}: its data position was written with rank_reading {written}; this run reads {now}. "
            "Resume with the same rank_reading and number of processes"
        )
    return saved[info.rank] if own_share else saved


def train_stage(
    embedder: torch.nn.Module,
    stage: StageConfig,
    *,
    data_root: Path,
    stage_dir: Path,
    recipe_dict: dict,
    info: DistInfo,
    seed: int,
    parallel: str = "ddp",
    resume: bool = True,
    evaluator=None,
) -> list[dict]:
    """Train ``embedder`` in place for one stage; return the logged metrics.

    Args:
        embedder: the (unwrapped) Embedder; wrapped here for DDP/FSDP when world > 1.
        stage: the stage config.
        data_root: dataset paths are relative to it.
        stage_dir: checkpoints, ``metrics.jsonl`` and ``curves.png`` go here.
        recipe_dict: the resolved recipe, saved beside every checkpoint.
        info: rank, world size and device.
        seed: data-order seed (the same on every rank).
        resume: continue from the newest checkpoint in ``stage_dir`` if there is one.
        evaluator: optional ``callable(embedder) -> {task: score}`` run every ``eval_every`` steps.
    """
    torch.manual_seed(seed)
    use_fast_dropout(embedder)
    ckpt_dir = stage_dir / "checkpoints"
    check_supported(stage.loss.distill, parallel, info.world)
    teacher = Teacher(stage.loss.distill, info.device, info.rank) if stage.loss.distill is not None else None
    projection = make_projection(embedder.hidden_size, teacher.dim, stage.loss.distill) if teacher else None
    extra = list(projection.to(info.device).parameters()) if projection is not None else []
    # mined STS negatives come from the weights the stage starts from (not yet the checkpoint's)
    miner = StsMiner(
        embedder,
        info,
        stage_dir / "mined",
        resuming=resume and latest_checkpoint(ckpt_dir) is not None,
        timeout_s=stage.eval_timeout_s,
    )
    try:
        sampler, report = build_sampler(
            stage.data,
            data_root,
            seed,
            info.world,
            in_batch_negatives=stage.loss.in_batch_negatives,
            rank=info.rank,
            mine_sts=miner,
        )
    finally:
        miner.close()
    own_share = stage.data.reads_own_share(info.world)  # each rank its own sampler
    if info.is_main:
        ready_checkpoint_dir(ckpt_dir)
    barrier()
    latest = resume_point(ckpt_dir, resume)
    sharded = latest is not None and is_sharded(latest)  # written under FSDP: loaded into the wrapped model below
    if latest is not None and not sharded and holds_weights(embedder):  # FSDP ranks > 0 hold a meta model
        load_model_weights(latest, embedder)  # before wrapping: DDP broadcasts and FSDP shards these weights
    if latest is not None and projection is not None:
        load_stage_only(latest, projection, PROJECTION)
    model = wrap_model(embedder, info, parallel)
    optimizer = build_optimizer(model, stage.optim, extra)
    scheduler = build_scheduler(optimizer, stage.optim, stage.steps)
    start = 0
    if latest is not None:
        if sharded:  # each rank reads only its own shards of the weights and optimizer state
            states = sharded_states(model, optimizer)
            load_sharded_states(latest, states)
            set_sharded_states(model, optimizer, states)
        state = load_training_state(latest, None if sharded else optimizer_loader(model, optimizer), scheduler)
        sampler.load_state_dict(_rank_sampler_state(state["sampler"], own_share, info, latest))
        start = state["step"]
    # ranks > 0 wait for rank 0's evaluations here, with a timeout of their own (not the group's)
    eval_group = patient_group(stage.eval_timeout_s) if evaluator is not None and stage.eval_every else None
    log_file = stage_dir / "metrics.jsonl"
    history = resume_log(log_file, start, rewrite=info.is_main)  # lines past the checkpoint are dropped
    precision = resolve_precision(stage.precision, info.device)
    autocast = functools.partial(precision_autocast, precision, info.device)
    B = stage.data.batch_size

    def tokenize(texts, prompts):  # the Embedder's own tokenisation: training text = inference text
        return embedder.tokenize(texts, prompt=prompts)

    model.train()
    bar = tqdm(
        total=stage.steps,
        initial=start,
        desc=f"stage {stage.name} ({precision})",
        disable=not info.is_main,
        unit="step",
    )
    window_start, window_examples, window_losses, window_skipped = time.perf_counter(), 0, [], 0
    window_tokens = torch.zeros((), dtype=torch.long, device=info.device)  # real (non-pad) tokens, no host sync
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    def head_lr() -> dict:  # the pooling head's own rate, where it has one (optim.head_lr / head_warmup_steps)
        rates = [lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()) if g.get("name") == HEAD_GROUP]
        return {"lr_head": rates[0]} if rates else {}

    sampler_state = sampler.state_dict()  # the data position of the last batch trained on (not read ahead)

    def draw_batch() -> tuple[ContrastiveBatch, dict]:  # in the prefetch thread, in order
        examples = sampler.next_batch()
        if not own_share:
            examples = examples[info.rank * B : (info.rank + 1) * B]  # this rank's slice is tokenised
        state = sampler.state_dict()
        return collate(examples, stage.data, tokenize, info.device, embedder.instruction_prompt, teacher), state

    batches = Prefetcher(draw_batch, (stage.steps - start) * stage.grad_accum_steps)

    def save(step: int) -> None:
        positions = _gather(sampler_state, info) if own_share else sampler_state  # every rank's own position
        with batches.paused():  # the prefetch thread counts into the report as it reads
            summary = (_merged(report, info) if own_share else report).summary()
        trainer_state = {"sampler": positions, "stage": stage.name, "data_report": summary}
        scores = {k: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
        metrics = scores if history and history[-1]["step"] == step else {}  # an evaluation at this very step
        if is_fsdp(model):  # every rank writes its own shards: nothing is gathered
            states = sharded_states(model, optimizer)
            save_sharded_checkpoint(ckpt_dir, step, states, scheduler, trainer_state, recipe_dict, metrics=metrics)
        elif info.is_main:
            model_state = full_model_state(model)
            if projection is not None:  # trained beside the model: in the checkpoint, never in a saved model
                model_state.update({PROJECTION + k: v for k, v in projection.state_dict().items()})
            save_checkpoint(
                ckpt_dir,
                step,
                model_state,
                optimizer.state_dict(),
                scheduler,
                trainer_state,
                recipe_dict,
                metrics=metrics,
            )
        if info.is_main:
            prune_checkpoints(ckpt_dir, stage.keep_last_checkpoints, stage.best_metric)
        barrier()

    # CPU: freed step buffers stay mapped (not page-faulted back in every step); the prefetch
    # thread is closed on the way out, whatever ends the loop
    with (
        keep_freed_memory(info.device.type == "cpu"),
        contextlib.closing(batches),
        contextlib.closing(teacher) if teacher is not None else contextlib.nullcontext(),
    ):
        for step in range(start, stage.steps):
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for micro in range(stage.grad_accum_steps):
                batch, sampler_state = batches.next()
                window_tokens += batch.queries["attention_mask"].sum() + batch.docs["attention_mask"].sum()
                losses.append(
                    contrastive_step(
                        model,
                        batch,
                        stage.loss,
                        info,
                        grad_cache_chunk=stage.grad_cache_chunk,
                        scale=1.0 / stage.grad_accum_steps,
                        sync=micro == stage.grad_accum_steps - 1,
                        autocast=autocast,
                        projection=projection,
                    )
                )
            loss = _mean_over_ranks(torch.stack(losses).mean(), info)
            average_gradients(extra, info)  # trained outside DDP: each rank holds its own loss's gradient
            # gradients are already reduced over ranks here, so every rank sees the same norm and decides alike
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [*model.parameters(), *extra], stage.optim.max_grad_norm or float("inf")
            )
            checked = {"loss": loss, "gradient norm": float(grad_norm)}
            bad = next((name for name, value in checked.items() if not math.isfinite(value)), None)
            if bad is not None and stage.on_nonfinite == "stop":
                raise TrainingError(
                    f"stage {stage.name!r}: {bad} became {checked[bad]} at step {step + 1}; stopped before updating the "
                    f"weights. The last good checkpoint is "
                    f"{latest_checkpoint(ckpt_dir) or 'none (no checkpoint was written yet)'}"
                )
            if bad is not None:  # on_nonfinite: skip -- no update; the schedule and the data stream move on
                optimizer.zero_grad(set_to_none=True)
                window_skipped += 1
                if info.is_main:
                    tqdm.write(f"stage {stage.name!r}: {bad} became {checked[bad]} at step {step + 1}; step skipped")
            else:
                optimizer.step()
                window_losses.append(loss)
            scheduler.step()
            window_examples += B * info.world * stage.grad_accum_steps
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            evaluate = (
                evaluator is not None and stage.eval_every and (done % stage.eval_every == 0 or done == stage.steps)
            )
            if evaluate or done % stage.log_every == 0 or done == stage.steps:  # a row per window and per evaluation
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": done,
                    # mean over the steps since the last row (skipped non-finite steps left out)
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "loss_last": loss,
                    "lr": scheduler.get_last_lr()[0],
                    **head_lr(),
                    "grad_norm": float(grad_norm),
                    "examples_per_s": window_examples / max(elapsed, 1e-9),
                    "tokens_per_s": _sum_over_ranks(window_tokens, info)
                    / max(elapsed, 1e-9),  # all ranks, pads left out
                    "skipped_steps": window_skipped,  # non-finite steps skipped in this window (on_nonfinite: skip)
                }
                if teacher is not None:  # texts so far (batches read ahead included): embedded, found in the cache
                    row["teacher_embedded"], row["teacher_cached"] = teacher.computed, teacher.cached
                if info.device.type == "cuda":  # this rank's peak since the stage began
                    row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                window_start, window_examples, window_losses, window_skipped = time.perf_counter(), 0, [], 0
                window_tokens.zero_()
                if evaluate:
                    if is_fsdp(model):  # rank 0 evaluates its unsharded copy: the shards are gathered into it
                        trained = full_model_state(model)
                        if info.is_main:
                            embedder.load_state_dict(trained, strict=False)  # frozen weights never change
                    if info.is_main:
                        embedder.eval()
                        with batches.paused():  # evaluation tokenises too; the tokenizer is not shared across threads
                            row.update({f"eval/{k}": v for k, v in evaluator(embedder).items()})
                        model.train()
                    barrier(eval_group)
                history.append(row)
                if info.is_main:
                    with log_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
            if stage.save_every and done % stage.save_every == 0 and done != stage.steps:
                save(done)
    bar.close()
    if latest is None or start < stage.steps:
        save(stage.steps)
    if is_fsdp(model) and holds_weights(embedder):
        load_model_weights(latest_checkpoint(ckpt_dir), embedder)  # the trained weights, unsharded
    if eval_group is not None:
        dist.destroy_process_group(eval_group)
    if own_share:
        report = _merged(report, info)
    if info.is_main:
        print(f"stage {stage.name}: data {report.summary()}")
    return history
