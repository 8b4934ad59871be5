"""One contrastive stage: InfoNCE (with Matryoshka, spread-out and distillation terms) over
queries and documents gathered from every rank, as an :class:`~embforge.train.trainer.Objective`.

Every rank draws the same *global* batch from an identically seeded sampler and keeps its slice
(so a run on R processes sees exactly the batches of a 1-process run with R× the batch), or,
with ``rank_reading: own_share``, reads only its share of the data; embeds queries and documents
(plainly or with GradCache) and backpropagates the loss whose documents are gathered from all
ranks. The loop around it is :func:`embforge.train.trainer.train`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from embforge.data.records import DataReport
from embforge.data.sharding import gather_over_ranks
from embforge.errors import CheckpointError
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
from embforge.train.batches import ContrastiveBatch, build_sampler, collate
from embforge.train.checkpoint import latest_checkpoint, load_stage_only
from embforge.train.distill import PROJECTION, Teacher, check_supported, distill_loss, make_projection
from embforge.train.dropout import use_fast_dropout
from embforge.train.grad_cache import grad_cache_step, split_features
from embforge.train.parallel import DistInfo, no_sync
from embforge.train.recipe import LossConfig, StageConfig
from embforge.train.sts_mining import StsMiner
from embforge.train.trainer import LoopConfig, train


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


def _merged(report: DataReport, info: DistInfo) -> DataReport:
    """The data counts of every rank added up (a collective)."""
    total = DataReport()
    for other in gather_over_ranks(report, world=info.world):
        total.merge(other)
    return total


class ContrastiveObjective:
    """A stage's sampler, teacher and projection, and its step (see :class:`~embforge.train.trainer.Objective`)."""

    def __init__(
        self, embedder, stage: StageConfig, data_root: Path, stage_dir: Path, info: DistInfo, resume: bool, seed: int
    ):
        use_fast_dropout(embedder)
        self.embedder, self.stage, self.info = embedder, stage, info
        self.teacher = Teacher(stage.loss.distill, info.device, info.rank) if stage.loss.distill is not None else None
        self.projection = (
            make_projection(embedder.hidden_size, self.teacher.dim, stage.loss.distill) if self.teacher else None
        )
        self.extra_parameters = list(self.projection.to(info.device).parameters()) if self.projection else []
        # mined STS negatives come from the weights the stage starts from (not yet the checkpoint's)
        miner = StsMiner(
            embedder,
            info,
            stage_dir / "mined",
            resuming=resume and latest_checkpoint(stage_dir / "checkpoints") is not None,
            timeout_s=stage.eval_timeout_s,
        )
        try:
            self.sampler, self.report = build_sampler(
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
        self.own_share = stage.data.reads_own_share(info.world)  # each rank its own sampler
        self.start_position = self.sampler.state_dict()

    def tokenize(self, texts, prompts):  # the Embedder's own tokenisation: training text = inference text
        return self.embedder.tokenize(texts, prompt=prompts)

    def draw(self) -> tuple[ContrastiveBatch, dict]:
        examples = self.sampler.next_batch()
        B = self.stage.data.batch_size
        if not self.own_share:
            examples = examples[self.info.rank * B : (self.info.rank + 1) * B]  # this rank's slice is tokenised
        state = self.sampler.state_dict()
        batch = collate(
            examples,
            self.stage.data,
            self.tokenize,
            self.info.device,
            self.embedder.head.instruction_prompt,
            self.teacher,
        )
        return batch, state

    def step(self, model, batch: ContrastiveBatch, *, scale: float, sync: bool, autocast) -> tuple[torch.Tensor, dict]:
        loss = contrastive_step(
            model,
            batch,
            self.stage.loss,
            self.info,
            grad_cache_chunk=self.stage.grad_cache_chunk,
            scale=scale,
            sync=sync,
            autocast=autocast,
            projection=self.projection,
        )
        tokens = batch.queries["attention_mask"].sum() + batch.docs["attention_mask"].sum()  # real tokens, no sync
        return loss, {"examples": self.stage.data.batch_size, "tokens": tokens}

    def row(self, counts: dict) -> dict:
        if self.teacher is None:
            return {}
        # texts so far (batches read ahead included): embedded, found in the cache
        return {"teacher_embedded": self.teacher.computed, "teacher_cached": self.teacher.cached}

    def load(self, checkpoint: Path, state: dict | None) -> None:
        if state is None:
            if self.projection is not None:
                load_stage_only(checkpoint, self.projection, PROJECTION)
        else:
            self.sampler.load_state_dict(_rank_sampler_state(state["sampler"], self.own_share, self.info, checkpoint))
            self.start_position = self.sampler.state_dict()

    def checkpoint_state(self, position) -> tuple[dict, dict]:
        if position is None:  # nothing trained since the start: the position the sampler began at
            position = self.start_position
        positions = (
            gather_over_ranks(position, world=self.info.world) if self.own_share else position
        )  # every rank's own
        summary = (_merged(self.report, self.info) if self.own_share else self.report).summary()
        trainer_state = {"sampler": positions, "stage": self.stage.name, "data_report": summary}
        extra = {}
        if self.projection is not None:  # trained beside the model: in the checkpoint, never in a saved model
            extra = {PROJECTION + k: v for k, v in self.projection.state_dict().items()}
        return trainer_state, extra

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()


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
        embedder: the (unwrapped) Embedder; wrapped for DDP/FSDP when world > 1.
        stage: the stage config.
        data_root: dataset paths are relative to it.
        stage_dir: checkpoints, ``metrics.jsonl`` and ``curves.png`` go here.
        recipe_dict: the resolved recipe, saved beside every checkpoint.
        info: rank, world size and device.
        seed: data-order seed (the same on every rank).
        resume: continue from the newest checkpoint in ``stage_dir`` if there is one.
        evaluator: optional ``callable(embedder) -> {task: score}`` run every ``eval_every`` steps.
    """
    check_supported(stage.loss.distill, parallel, info.world)
    objective = None

    def setup():
        nonlocal objective
        objective = ContrastiveObjective(embedder, stage, data_root, stage_dir, info, resume, seed)
        return embedder, objective

    cfg = LoopConfig(
        name=f"stage {stage.name!r}",
        steps=stage.steps,
        optim=stage.optim,
        precision=stage.precision,
        grad_accum_steps=stage.grad_accum_steps,
        on_nonfinite=stage.on_nonfinite,
        log_every=stage.log_every,
        eval_every=stage.eval_every,
        save_every=stage.save_every,
        keep_last_checkpoints=stage.keep_last_checkpoints,
        best_metric=stage.best_metric,
        eval_timeout_s=stage.eval_timeout_s,
    )
    scores = None if evaluator is None else (lambda model: {f"eval/{k}": v for k, v in evaluator(model).items()})
    history = train(
        setup,
        cfg,
        stage_dir=stage_dir,
        recipe_dict=recipe_dict,
        info=info,
        seed=seed,
        parallel=parallel,
        resume=resume,
        evaluator=scores,
    )
    report = _merged(objective.report, info) if objective.own_share else objective.report
    if info.is_main:
        print(f"stage {stage.name}: data {report.summary()}")
    return history
