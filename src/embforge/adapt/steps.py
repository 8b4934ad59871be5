"""The steps of ``embforge adapt`` (:mod:`embforge.adapt.pipeline` runs them in order): the corpus,
the held-back slice and its scores, the step-time measurement, the training recipe, and the
merge-weight search.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np

from embforge.adapt.corpus import AdaptData, Pair
from embforge.adapt.settings import AdaptSettings
from embforge.errors import DataError
from embforge.modeling.head import prompts_of


class Corpus:
    """The corpus's distinct texts (a copy under two ids is one passage) and the base model's embeddings."""

    def __init__(self, data: AdaptData):
        self.texts = list(dict.fromkeys(data.texts))
        index = {t: i for i, t in enumerate(self.texts)}
        self.of_id = {d: index[t] for d, t in zip(data.ids, data.texts)}


def side_prompt(model, side: str) -> str | None:
    """The model's prompt name for ``side`` (``query`` / ``document``) where it has one, else None."""
    return side if side in prompts_of(model) else None


def encode(model, texts: list[str], side: str, batch_size: int = 64, show: bool = True) -> np.ndarray:
    encode = model.encode_queries if side == "query" else model.encode_documents
    return encode(texts, batch_size=batch_size, show_progress=show)


def consistency_filter(query_emb: np.ndarray, corpus_emb: np.ndarray, own: np.ndarray, top_k: int) -> np.ndarray:
    from embforge.data.filtering import consistent

    return consistent(query_emb, corpus_emb, own, top_k)


def hold_back(
    labelled: list[Pair], made: list[Pair], corpus: Corpus, settings: AdaptSettings
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(labelled to train, pseudo pairs to filter and train, held back), drawn with the seed.

    With labelled pairs, a slice of their queries (all pairs of a query together) is held back;
    without, a slice of the passages with all their pseudo-queries, *unfiltered*: filtered ones are
    by construction pairs the base model already ranks in its top k, so they could not show what
    training changed. Nothing trains on a held-back passage as a positive.
    """
    group = (lambda p: p.query) if labelled else (lambda p: corpus.of_id[p.doc_id])
    pool = labelled or made
    keys = sorted({group(p) for p in pool}, key=str)
    random.Random(settings.seed).shuffle(keys)
    n = min(300, max(20, round(settings.holdout * len(keys))))
    if n >= len(keys):
        raise DataError(f"only {len(keys)} distinct queries/passages to train on: too few to hold any back")
    held_keys = set(keys[:n])
    held = [p for p in pool if group(p) in held_keys]
    held_docs = {corpus.of_id[p.doc_id] for p in held}

    def trains(p: Pair) -> bool:
        return group(p) not in held_keys and corpus.of_id[p.doc_id] not in held_docs

    return [p for p in labelled if trains(p)], [p for p in made if trains(p)], held


def held_scores(
    model, held: list[dict], corpus: Corpus, eval_ids: list[int], batch_size: int, d_emb: np.ndarray | None = None
) -> dict[str, float]:
    """nDCG@10, recall@10 and MRR@10 (×100) of the held-back queries over the evaluation passages.

    ``d_emb``: the passages' embeddings by ``model`` where already known (the base's, cached).
    """
    from embforge.eval import metrics
    from embforge.eval.tasks import search

    queries = sorted({h["query"] for h in held})
    qrels: dict[str, dict[str, int]] = {}
    for h in held:
        qrels.setdefault(str(queries.index(h["query"])), {})[str(h["doc"])] = 1
    q_emb = encode(model, queries, "query", batch_size, show=False)
    if d_emb is None:
        d_emb = encode(model, [corpus.texts[i] for i in eval_ids], "document", batch_size, show=False)
    ranked = search(q_emb, d_emb, [str(i) for i in eval_ids], top_k=10)
    scores = metrics.retrieval_scores({str(i): r for i, r in enumerate(ranked)}, qrels, (10,))
    return {k: 100 * scores[k] for k in ("ndcg_at_10", "recall_at_10", "mrr_at_10")}


def measure_step_s(model, rows: list[dict], settings: AdaptSettings, recipe) -> float:
    """Seconds per optimizer step of the planned stage, measured on a copy of the model (3 steps, last 2 timed)."""
    import copy

    import torch

    from embforge.data.pairs import Example
    from embforge.data.records import TrainingRecord
    from embforge.precision import autocast, resolve_precision
    from embforge.train.batches import collate
    from embforge.train.contrastive import contrastive_step
    from embforge.train.parallel import DistInfo

    stage = recipe.stages[0]
    trial = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in trial.parameters() if p.requires_grad], lr=1e-9)
    batch_rows = rows[: settings.batch_size]
    examples = [
        Example(0, TrainingRecord(r["query"], [r["positive"]], r["negatives"]), r["positive"], r["negatives"])
        for r in batch_rows
    ]
    data = stage.data
    precision = resolve_precision(stage.precision, torch.device("cpu"))
    times = []
    with torch.random.fork_rng():
        for _ in range(3):
            start = time.perf_counter()
            batch = collate(examples, data, lambda t, p: trial.tokenize(t, prompt=p), trial.device)
            optimizer.zero_grad()
            loss_cfg = dataclasses.replace(stage.loss, distill=None)
            contrastive_step(trial, batch, loss_cfg, DistInfo(), autocast=lambda: autocast(precision, trial.device))
            optimizer.step()
            times.append(time.perf_counter() - start)
    factor = 1.6 if stage.loss.distill is not None else 1.0  # the teacher's forward on unseen texts
    return float(np.mean(times[1:])) * factor


def train_recipe(
    settings: AdaptSettings,
    output: Path,
    steps: int,
    files: dict[str, str],
    weights: dict[str, float],
    prompts: dict,
    run: int = 0,
):
    """The one-stage training recipe of run ``run`` (seed ``settings.seed + run``, in ``OUT/train/run-<run>``);
    ``prompts``: the model's (its query / document prompts go on each side)."""
    from embforge.config import from_dict
    from embforge.train.recipe import RecipeConfig

    model = {"name_or_path": settings.model}
    if settings.max_seq_len:
        model["max_seq_len"] = settings.max_seq_len
    # query -> passage only: the symmetric loss scored lower on held-out MLQuestions (docs/adapt.md)
    loss = {"temperature": settings.temperature, "symmetric": False}
    if settings.teacher:
        loss["distill"] = {
            "teacher": settings.teacher,
            "embedding": "cosine",
            "embedding_weight": 1.0,
            "kl_weight": 1.0,
            "cache_dir": str(output / "work" / "teacher-cache"),
        }
    raw = {
        "model": model,
        "output_dir": str(output / "train" / f"run-{run}"),
        "data_root": str(output / "work"),
        "seed": settings.seed + run,
        "stages": [
            {
                "name": "adapt",
                "steps": steps,
                "log_every": max(1, min(20, steps // 10)),
                "save_every": max(10, steps // 5),
                "keep_last_checkpoints": 1,
                "data": {
                    "batch_size": settings.batch_size,
                    "sampler": "proportional",
                    "num_negatives": settings.num_negatives,
                    "datasets": [
                        {
                            "name": n,
                            "path": f,
                            "weight": weights[n],
                            "query_prompt": prompts.get("query", ""),
                            "document_prompt": prompts.get("document", ""),
                        }
                        for n, f in files.items()
                    ],
                },
                "loss": loss,
                "optim": {"lr": settings.lr, "warmup_steps": max(1, steps // 10), "schedule": "linear"},
            }
        ],
    }
    return from_dict(RecipeConfig, raw)


def search_weight(score, tolerance: float) -> tuple[dict[str, dict], float]:
    """The merge weight: ``score(w)`` (held-back scores) at w = 0, 1 and 0.5, then at the midpoint
    between the best of those and its better neighbour; the largest w within ``tolerance``
    nDCG@10 points of the best is chosen (closest to the trained model). -> (curve by str(w), chosen)."""
    curve = {w: score(w) for w in (0.0, 1.0, 0.5)}
    ndcg = {w: c["ndcg_at_10"] for w, c in curve.items()}
    best = max(ndcg, key=lambda w: (ndcg[w], -w))
    if best == 0.5:
        refine = 0.75 if ndcg[1.0] >= ndcg[0.0] else 0.25
    else:
        refine = 0.75 if best == 1.0 else 0.25
    curve[refine] = score(refine)
    top = max(c["ndcg_at_10"] for c in curve.values())
    chosen = max(w for w, c in curve.items() if c["ndcg_at_10"] >= top - tolerance)
    return {str(w): curve[w] for w in sorted(curve)}, chosen


def batch_shares(rows: dict[str, int], settings: AdaptSettings) -> dict[str, float]:
    """Each training file's share of every batch: ``labelled_share`` for the labelled pairs where both
    kinds exist, but never more than half the labelled rows per batch (a batch holds distinct texts)."""
    present = {n: r for n, r in rows.items() if r}
    if len(present) == 1:
        return {n: 1.0 for n in present}
    labelled = min(settings.labelled_share, 0.5 * present["labelled"] / settings.batch_size)
    return {"labelled": labelled, "pseudo": 1.0 - labelled}


def interpolate(base_state: dict, tuned_state: dict, w: float) -> dict:
    return {
        k: (base_state[k] + w * (tuned_state[k] - base_state[k])) if base_state[k].is_floating_point() else v
        for k, v in tuned_state.items()
    }
