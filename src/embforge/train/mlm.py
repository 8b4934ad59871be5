"""MLM pre-training of nomic-bert from scratch (paper §4.1): an objective for the one training loop
(:func:`embforge.train.trainer.train`), in one process or under ``torchrun`` (DDP).

Per step: take ``batch_size`` packed chunks (a seeded permutation per epoch), mask them
with a generator seeded by (seed, step), predict the masked tokens (logits only at
masked positions), cross-entropy, AdamW step, LR schedule. Before training, every
``eval_every`` steps and at the end, the masked-token accuracy on the held-back slice
(fixed masks) goes to ``metrics.jsonl`` and ``curves.png``. Checkpoints are atomic
(:mod:`embforge.train.checkpoint`); since batches and masks are functions of the step,
a resumed run continues the same trajectory. The backbone is exported to
``<output_dir>/model`` as a transformers folder (``AutoModel`` loads it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import random
from pathlib import Path

import numpy as np
import torch

from embforge.atomic import atomic_folder
from embforge.config import to_dict
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
from embforge.models.nomic_bert import NomicBertForMLM, build_backbone
from embforge.models.nomic_bert_config import from_name
from embforge.models.tokenizers import nomic_tokenizer
from embforge.precision import autocast as precision_autocast
from embforge.precision import resolve_precision
from embforge.train.mlm_recipe import MLMDataConfig, MLMRecipeConfig
from embforge.train.parallel import DistInfo, no_sync
from embforge.train.trainer import LoopConfig, train

_EVAL_SEED_OFFSET = 7919  # the held-back masks use their own fixed seed


@dataclasses.dataclass
class MLMData:
    train: torch.Tensor  # (N, chunk_len) packed training chunks
    heldout: torch.Tensor  # (M, chunk_len) packed held-back chunks
    stats: dict


def load_mlm_data(cfg: MLMDataConfig, data_root: Path, tokenizer) -> MLMData:
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

    def __init__(self, recipe: MLMRecipeConfig, data: MLMData, mask_kwargs: dict, info: DistInfo):
        if recipe.batch_size % info.world:
            raise ConfigError(f"batch_size {recipe.batch_size} is not divisible by the {info.world} processes")
        self.recipe, self.data, self.mask_kwargs, self.info = recipe, data, mask_kwargs, info
        self.per_rank = recipe.batch_size // info.world
        self.micro = min(recipe.micro_batch_size or self.per_rank, self.per_rank)
        self.next_step = 0
        self.extra_parameters: list[torch.nn.Parameter] = []

    def draw(self) -> tuple[tuple[torch.Tensor, torch.Tensor, int], None]:
        step, seed = self.next_step, self.recipe.seed
        self.next_step += 1
        chunks = self.data.train[batch_indices(step, self.recipe.batch_size, len(self.data.train), seed)]  # (B, T)
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


def train_mlm(
    recipe: MLMRecipeConfig,
    data_root: Path,
    *,
    resume: bool = True,
    device: str | None = None,
    info: DistInfo | None = None,
) -> dict:
    """Pre-train a nomic-bert with MLM; return a summary (accuracy before/after, paths).

    Under ``torchrun`` (``info`` from :func:`~embforge.train.parallel.distributed_session`) the
    model is DDP-wrapped and each process trains on its slice of every batch: the same trajectory
    as one process.

    Args:
        recipe: the validated recipe.
        data_root: the recipe's text files are relative to it.
        resume: continue from the newest checkpoint in ``<output_dir>/checkpoints``;
            false refuses to start over existing checkpoints.
        device: one process: default CUDA if available, else CPU.
        info: rank, world size and device (default: one process on ``device``).
    """
    if info is None:
        info = DistInfo(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    elif device is not None and info.world > 1:
        raise ConfigError("--device applies to one process; under torchrun each rank uses its own device")
    elif device is not None:
        info = dataclasses.replace(info, device=torch.device(device))
    out_dir = Path(recipe.output_dir)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    spec = from_name(recipe.model.preset, **recipe.model.overrides)
    tokenizer = nomic_tokenizer(recipe.model.tokenizer, max_seq_len=spec.max_seq_len)
    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model vocabulary only {spec.vocab_size}")
    data = load_mlm_data(recipe.data, data_root, tokenizer)
    mask_kwargs = dict(
        mask_prob=recipe.data.mask_prob,
        mask_token_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids,
        vocab_size=len(tokenizer),
    )
    eval_kwargs = {**mask_kwargs, "mask_prob": recipe.data.eval_mask_prob or recipe.data.mask_prob}
    precision = resolve_precision(recipe.precision, info.device)
    autocast = functools.partial(precision_autocast, precision, info.device)
    model = None

    def setup():
        nonlocal model
        model = NomicBertForMLM(build_backbone(spec)).to(info.device)
        if info.is_main:
            print(
                f"mlm: {num_parameters(model.backbone):,} backbone parameters, {precision}, "
                f"{info.world} process(es), data {json.dumps(data.stats)}",
                flush=True,
            )
        return model, MLMObjective(recipe, data, mask_kwargs, info)

    def evaluate(module) -> dict:
        seed = recipe.seed + _EVAL_SEED_OFFSET
        acc, loss = masked_accuracy(module, data.heldout, eval_kwargs, seed, recipe.eval_batch_size, autocast)
        return {"eval/masked_acc": acc, "heldout_loss": loss}

    cfg = LoopConfig(
        name="mlm",
        steps=recipe.steps,
        optim=dataclasses.replace(recipe.optim, warmup_steps=recipe.warmup_steps),
        precision=recipe.precision,
        on_nonfinite=recipe.on_nonfinite,
        log_every=recipe.log_every,
        eval_every=recipe.eval_every,
        eval_at_start=True,
        eval_at_end=True,
        save_every=recipe.save_every,
        keep_last_checkpoints=recipe.keep_last_checkpoints,
    )
    history = train(
        setup,
        cfg,
        stage_dir=out_dir,
        recipe_dict=to_dict(recipe),
        info=info,
        seed=recipe.seed,
        resume=resume,
        evaluator=evaluate,
    )
    model_dir = out_dir / "model"
    log_file = out_dir / "metrics.jsonl"
    plot = out_dir / "curves.png"
    if info.is_main:
        with atomic_folder(model_dir) as tmp:
            model.backbone.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        from embforge.train.plots import plot_history

        plot = plot_history({"mlm": history}, plot, loss_label="MLM loss (masked tokens, per window)")
    evals = [h for h in history if "eval/masked_acc" in h]
    return {
        "masked_acc_before": evals[0]["eval/masked_acc"] if evals and evals[0]["step"] == 0 else None,
        "masked_acc_after": evals[-1]["eval/masked_acc"] if evals else None,
        "steps": recipe.steps,
        "data": data.stats,
        "metrics": str(log_file),
        "plot": str(plot),
        "model": str(model_dir),
    }
