"""MLM pre-training of nomic-bert (paper §4.1): a recipe stage with ``objective: mlm``, an objective
for the one training loop (:func:`embforge.train.trainer.train`), in one process or under
``torchrun`` (DDP).

Per step: take ``batch_size`` packed chunks (a seeded permutation per epoch), mask them
with a generator seeded by (seed, step), predict the masked tokens (logits only at
masked positions), cross-entropy, AdamW step, LR schedule. Before training, every
``eval_every`` steps and at the end, the masked-token accuracy on the held-back slice
(fixed masks) goes to ``metrics.jsonl`` and ``curves.png``. Checkpoints are atomic
(:mod:`embforge.train.checkpoint`); since batches and masks are functions of the step,
a resumed run continues the same trajectory. The stage's model (the backbone, without the MLM
head) is saved like any stage's, and the next stage continues from it in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import torch

from embforge.data.mlm import (
    IGNORE,
    expand_files,
    mask_tokens,
    pack_chunks,
    read_documents,
    split_heldout,
    tokenize_documents,
)
from embforge.errors import ConfigError, DataError
from embforge.modeling.pooling import num_parameters
from embforge.models.nomic_bert import NomicBertForMLM
from embforge.precision import autocast as precision_autocast
from embforge.precision import resolve_precision
from embforge.train.mlm_recipe import MLMConfig
from embforge.train.parallel import DistInfo, no_sync
from embforge.train.recipe import StageConfig
from embforge.train.trainer import LoopConfig, train

_EVAL_SEED_OFFSET = 7919  # the held-back masks use their own fixed seed
_HEAD_SEED_OFFSET = 104_729  # and the MLM head's initialisation its own


@dataclasses.dataclass
class MLMData:
    train: torch.Tensor  # (N, chunk_len) packed training chunks
    heldout: torch.Tensor  # (M, chunk_len) packed held-back chunks
    stats: dict


def load_mlm_data(cfg: MLMConfig, data_root: Path, tokenizer) -> MLMData:
    """Read, split (whole documents held back), tokenise and pack the recipe's text files."""
    docs: list[str] = []
    for path in expand_files(cfg.files, data_root):
        docs += read_documents(path, cfg.format, cfg.text_field)
    train_docs, held_docs = split_heldout(docs, cfg.heldout_fraction)
    train, dropped = pack_chunks(
        tokenize_documents(train_docs, tokenizer), cfg.chunk_len, tokenizer.cls_token_id, tokenizer.sep_token_id
    )
    heldout, _ = pack_chunks(
        tokenize_documents(held_docs, tokenizer), cfg.chunk_len, tokenizer.cls_token_id, tokenizer.sep_token_id
    )
    if cfg.heldout_max_chunks:
        heldout = heldout[: cfg.heldout_max_chunks]
    if len(train) == 0 or len(heldout) == 0:
        raise DataError(
            f"too little text for chunks of {cfg.chunk_len} tokens: {len(train)} training, {len(heldout)} held-back chunks"
        )
    stats = {
        "documents": len(docs),
        "heldout_documents": len(held_docs),
        "train_chunks": len(train),
        "heldout_chunks": len(heldout),
        "train_tokens": train.numel(),
        "dropped_tail_tokens": dropped,
    }
    return MLMData(train, heldout, stats)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Chunk indices of ``step``: consecutive slices of one seeded permutation per epoch."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perms[epoch][pos])
    return torch.stack(out)


def mlm_loss(
    model: NomicBertForMLM, inputs: torch.Tensor, labels: torch.Tensor, autocast, reduction: str = "mean"
) -> tuple[torch.Tensor, int, int]:
    """(cross-entropy over the masked tokens — mean or sum —, correct predictions, masked tokens)."""
    where = labels != IGNORE  # (B, T)
    with autocast():
        logits = model(inputs, positions=where)  # (M, V)
    targets = labels[where]  # (M,)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)
    correct = int((logits.detach().argmax(-1) == targets).sum())
    return loss, correct, int(targets.numel())


@torch.no_grad()
def masked_accuracy(
    model: NomicBertForMLM, chunks: torch.Tensor, mask_kwargs: dict, seed: int, batch_size: int, autocast
) -> tuple[float, float]:
    """(masked-token accuracy ×100, mean loss) on ``chunks`` with masks fixed by ``seed``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(chunks), batch_size):
        inputs, labels = mask_tokens(chunks[start : start + batch_size], generator=generator, **mask_kwargs)
        loss, c, n = mlm_loss(model, inputs.to(device), labels.to(device), autocast)
        correct, total, loss_sum = correct + c, total + n, loss_sum + float(loss) * n
    model.train(was_training)
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)


class MLMObjective:
    """Masked-token prediction on packed chunks (see :class:`~embforge.train.trainer.Objective`).

    Step ``s``'s chunks and masks are functions of ``(seed, s)``, drawn for the whole batch on every
    rank; each rank trains on its slice (``batch_size / world`` chunks, in micro-batches). The
    cross-entropy is summed and divided by the masked tokens of the whole batch, so the gradient
    is the full batch's mean however the batch is split (DDP's averaging undone by ``world``).
    """

    def __init__(self, cfg: MLMConfig, seed: int, data: MLMData, mask_kwargs: dict, info: DistInfo):
        if cfg.batch_size % info.world:
            raise ConfigError(f"mlm.batch_size {cfg.batch_size} is not divisible by the {info.world} processes")
        self.cfg, self.seed, self.data, self.mask_kwargs, self.info = cfg, seed, data, mask_kwargs, info
        self.per_rank = cfg.batch_size // info.world
        self.micro = min(cfg.micro_batch_size or self.per_rank, self.per_rank)
        self.next_step = 0
        self.extra_parameters: list[torch.nn.Parameter] = []

    def draw(self) -> tuple[tuple[torch.Tensor, torch.Tensor, int], None]:
        step, seed = self.next_step, self.seed
        self.next_step += 1
        chunks = self.data.train[batch_indices(step, self.cfg.batch_size, len(self.data.train), seed)]  # (B, T)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        inputs, labels = mask_tokens(chunks, generator=generator, **self.mask_kwargs)
        masked = int((labels != IGNORE).sum())  # of the whole batch
        mine = slice(self.info.rank * self.per_rank, (self.info.rank + 1) * self.per_rank)
        return (inputs[mine], labels[mine], masked), None

    def step(self, model, batch, *, scale: float, sync: bool, autocast) -> tuple[torch.Tensor, dict]:
        inputs, labels, masked = batch
        device = self.info.device
        loss, correct = torch.zeros(()), 0
        starts = range(0, len(inputs), self.micro)
        for start in starts:
            part = slice(start, start + self.micro)
            last = sync and start == starts[-1]
            with contextlib.nullcontext() if last else no_sync(model):  # DDP all-reduces on the last part only
                part_loss, part_correct, _ = mlm_loss(
                    model, inputs[part].to(device), labels[part].to(device), autocast, "sum"
                )
                part_loss = part_loss * (self.info.world * scale) / max(masked, 1)
                part_loss.backward()
            loss, correct = loss + part_loss.detach().cpu() / scale, correct + part_correct
        counts = {"examples": len(inputs), "tokens": inputs.numel(), "correct": correct}
        return loss, {**counts, "masked": int((labels != IGNORE).sum())}

    def row(self, counts: dict) -> dict:
        return {"train_masked_acc": 100.0 * counts["correct"] / max(counts["masked"], 1)}

    def load(self, checkpoint: Path, state: dict | None) -> None:
        if state is not None:
            self.next_step = state["step"]  # batches and masks are functions of the step

    def checkpoint_state(self, position) -> tuple[dict, dict]:
        return {"data": self.data.stats, "objective": "mlm"}, {}

    def close(self) -> None:
        pass


def mlm_model(embedder: torch.nn.Module, seed: int = 0) -> NomicBertForMLM:
    """``embedder``'s backbone with a new MLM head (on the backbone's device); the backbone is shared.

    The head is initialised from its own seed: the stage reseeds torch with the seed the backbone
    was built with, and a head drawn from that stream again would copy the backbone's first weights.
    """
    backbone = embedder.backbone
    if getattr(backbone.config, "model_type", None) != "nomic_bert":
        raise ConfigError(
            f"an mlm stage trains a nomic-bert backbone; this model's is {type(backbone).__name__} "
            "(start from a nomic_bert preset, e.g. model.name_or_path: nomic-bert-2048 with model.tokenizer)"
        )
    with torch.random.fork_rng():  # CPU and CUDA generators restored afterwards
        torch.manual_seed(seed + _HEAD_SEED_OFFSET)
        return NomicBertForMLM(backbone).to(next(backbone.parameters()).device)


def train_mlm_stage(
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
) -> list[dict]:
    """Train ``embedder``'s backbone in place with MLM for one stage (``objective: mlm``); return the
    logged metrics (masked-token accuracy on the held-back text before training, every
    ``eval_every`` steps and at the end, as ``eval/masked_acc``).

    Under ``torchrun`` the model is DDP-wrapped and each process trains on its slice of every
    batch: the same trajectory as one process. The MLM head is new for the stage and kept in its
    checkpoints, not in the saved model.
    """
    if parallel != "ddp" and info.world > 1:
        raise ConfigError(f"stage {stage.name!r}: mlm stages run under DDP (parallel: ddp), not {parallel}")
    cfg = stage.mlm
    trained_len = getattr(embedder.backbone.config, "max_position_embeddings", None)  # nomic-bert: the trained length
    if trained_len is not None and cfg.chunk_len > trained_len:
        raise ConfigError(
            f"stage {stage.name!r}: mlm.chunk_len {cfg.chunk_len} exceeds the model's trained length {trained_len}"
        )
    tokenizer = embedder.tokenizer
    data = load_mlm_data(cfg, data_root, tokenizer)
    mask_kwargs = dict(
        mask_prob=cfg.mask_prob,
        mask_token_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids,
        vocab_size=len(tokenizer),
    )
    eval_kwargs = {**mask_kwargs, "mask_prob": cfg.eval_mask_prob or cfg.mask_prob}
    precision = resolve_precision(stage.precision, info.device)
    autocast = functools.partial(precision_autocast, precision, info.device)

    def setup():
        model = mlm_model(embedder, seed)
        if info.is_main:
            print(
                f"mlm: {num_parameters(model.backbone):,} backbone parameters, {precision}, "
                f"{info.world} process(es), data {json.dumps(data.stats)}",
                flush=True,
            )
        return model, MLMObjective(cfg, seed, data, mask_kwargs, info)

    def evaluate(module) -> dict:
        batch = cfg.eval_batch_size
        acc, loss = masked_accuracy(module, data.heldout, eval_kwargs, seed + _EVAL_SEED_OFFSET, batch, autocast)
        return {"eval/masked_acc": acc, "heldout_loss": loss}

    loop = LoopConfig(
        name=f"stage {stage.name!r} (mlm)",
        steps=stage.steps,
        optim=stage.optim,
        precision=stage.precision,
        on_nonfinite=stage.on_nonfinite,
        log_every=stage.log_every,
        eval_every=stage.eval_every,
        eval_at_start=True,
        eval_at_end=True,
        save_every=stage.save_every,
        keep_last_checkpoints=stage.keep_last_checkpoints,
        best_metric="eval/masked_acc",
        eval_timeout_s=stage.eval_timeout_s,
    )
    history = train(
        setup,
        loop,
        stage_dir=stage_dir,
        recipe_dict=recipe_dict,
        info=info,
        seed=seed,
        parallel=parallel,
        resume=resume,
        evaluator=evaluate,
    )
    if info.is_main:
        print(f"stage {stage.name}: mlm {json.dumps(mlm_summary(history))}", flush=True)
    return history


def mlm_summary(history: list[dict]) -> dict:
    """Masked-token accuracy on the held-back text before and after an MLM stage (from its logged rows)."""
    evals = [h for h in history if "eval/masked_acc" in h]
    return {
        "masked_acc_before": evals[0]["eval/masked_acc"] if evals and evals[0]["step"] == 0 else None,
        "masked_acc_after": evals[-1]["eval/masked_acc"] if evals else None,
    }
