"""MLM pre-training of nomic-bert from scratch: one explicit loop (paper §4.1).

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

import dataclasses
import functools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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
from embforge.train.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    prune_checkpoints,
    ready_checkpoint_dir,
    resume_log,
    resume_point,
    save_checkpoint,
)
from embforge.train.host_memory import keep_freed_memory
from embforge.train.loop import TrainingError, build_optimizer
from embforge.train.mlm_recipe import MLMDataConfig, MLMRecipeConfig
from embforge.train.schedule import build_scheduler

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


def train_mlm(recipe: MLMRecipeConfig, data_root: Path, *, resume: bool = True, device: str | None = None) -> dict:
    """Pre-train a nomic-bert with MLM; return a summary (accuracy before/after, paths).

    Args:
        recipe: the validated recipe.
        data_root: the recipe's text files are relative to it.
        resume: continue from the newest checkpoint in ``<output_dir>/checkpoints``;
            false refuses to start over existing checkpoints.
        device: default CUDA if available, else CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("pretrain-mlm runs in one process; multi-process (torchrun) MLM is not implemented")
    out_dir = Path(recipe.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    ready_checkpoint_dir(ckpt_dir)
    latest = resume_point(ckpt_dir, resume)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = from_name(recipe.model.preset, **recipe.model.overrides)
    tokenizer = nomic_tokenizer(recipe.model.tokenizer, max_seq_len=spec.max_seq_len)
    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model vocabulary only {spec.vocab_size}")
    data = load_mlm_data(recipe.data, data_root, tokenizer)
    model = NomicBertForMLM(build_backbone(spec)).to(dev)
    optim_cfg = dataclasses.replace(recipe.optim, warmup_steps=recipe.warmup_steps)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, recipe.steps)
    start = 0
    if latest is not None:
        load_model_weights(latest, model)
        start = load_training_state(latest, optimizer.load_state_dict, scheduler)["step"]
    precision = resolve_precision(recipe.precision, dev)
    autocast = functools.partial(precision_autocast, precision, dev)
    mask_kwargs = dict(
        mask_prob=recipe.data.mask_prob,
        mask_token_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids,
        vocab_size=len(tokenizer),
    )
    eval_kwargs = {**mask_kwargs, "mask_prob": recipe.data.eval_mask_prob or recipe.data.mask_prob}
    eval_seed = recipe.seed + _EVAL_SEED_OFFSET
    recipe_dict = to_dict(recipe)

    log_file = out_dir / "metrics.jsonl"
    history = resume_log(log_file, start)  # lines past the checkpoint are dropped

    def log(row: dict) -> None:
        history.append(row)
        with log_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate() -> dict:
        acc, loss = masked_accuracy(model, data.heldout, eval_kwargs, eval_seed, recipe.eval_batch_size, autocast)
        return {"eval/masked_acc": acc, "heldout_loss": loss}

    def save(step: int) -> None:
        trainer_state = {"data": data.stats, "objective": "mlm"}
        last = history[-1] if history and history[-1]["step"] == step else {}
        metrics = {k: v for k, v in last.items() if k.startswith("eval/")}  # an evaluation at this very step
        save_checkpoint(
            ckpt_dir,
            step,
            model.state_dict(),
            optimizer.state_dict(),
            scheduler,
            trainer_state,
            recipe_dict,
            metrics=metrics,
        )
        prune_checkpoints(ckpt_dir, recipe.keep_last_checkpoints)

    print(
        f"mlm: {num_parameters(model.backbone):,} backbone parameters, {precision}, data {json.dumps(data.stats)}",
        flush=True,
    )
    if start == 0:
        log({"step": 0, **evaluate()})
    model.train()
    micro = recipe.micro_batch_size or recipe.batch_size
    bar = tqdm(total=recipe.steps, initial=start, desc=f"mlm ({precision})", unit="step")
    window = {"loss": 0.0, "correct": 0, "masked": 0, "steps": 0, "t0": time.perf_counter()}
    # CPU: freed step buffers stay mapped instead of page-faulting back in every step
    with keep_freed_memory(dev.type == "cpu"):
        for step in range(start, recipe.steps):
            chunks = data.train[batch_indices(step, recipe.batch_size, len(data.train), recipe.seed)]  # (B, T)
            generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
            inputs, labels = mask_tokens(chunks, generator=generator, **mask_kwargs)
            optimizer.zero_grad(set_to_none=True)
            # micro-batches accumulate sum(CE) / (masked tokens of the whole batch): the full batch's mean
            masked = int((labels != IGNORE).sum())
            loss, correct = torch.zeros(()), 0
            for part in range(0, len(inputs), micro):
                part_loss, part_correct, _ = mlm_loss(
                    model, inputs[part : part + micro].to(dev), labels[part : part + micro].to(dev), autocast, "sum"
                )
                part_loss = part_loss / max(masked, 1)
                if not math.isfinite(float(part_loss.detach())):
                    raise TrainingError(
                        f"mlm: loss became {float(part_loss.detach())} at step {step + 1}; stopped before updating the weights. "
                        f"The last good checkpoint is {latest_checkpoint(ckpt_dir) or 'none (no checkpoint was written yet)'}"
                    )
                part_loss.backward()
                loss, correct = loss + part_loss.detach().cpu(), correct + part_correct
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            done = step + 1
            window["loss"] += float(loss)
            window["correct"] += correct
            window["masked"] += masked
            window["steps"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            row: dict = {}
            if done % recipe.log_every == 0 or done == recipe.steps:
                elapsed = time.perf_counter() - window["t0"]
                row = {
                    "loss": window["loss"] / window["steps"],
                    "train_masked_acc": 100.0 * window["correct"] / max(window["masked"], 1),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window["steps"] * chunks.numel() / max(elapsed, 1e-9),
                }
                window = {"loss": 0.0, "correct": 0, "masked": 0, "steps": 0, "t0": time.perf_counter()}
            if (recipe.eval_every and done % recipe.eval_every == 0) or done == recipe.steps:
                row.update(evaluate())
            if row:
                log({"step": done, **row})
            if recipe.save_every and done % recipe.save_every == 0 and done != recipe.steps:
                save(done)
    bar.close()
    if latest is None or start < recipe.steps:
        save(recipe.steps)
    model_dir = out_dir / "model"
    with atomic_folder(model_dir) as tmp:
        model.backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    from embforge.train.plots import plot_history

    plot = plot_history({"mlm": history}, out_dir / "curves.png", loss_label="MLM loss (masked tokens, per window)")
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
