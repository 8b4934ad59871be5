"""``embforge adapt``: a base model and a user's corpus in, a better model for that corpus out.

Steps (each one's result is written to ``OUT/work`` atomically, so re-running the same command
after a kill continues where it stopped; training resumes from its checkpoints):

1. **pairs**: labelled pairs (``queries.jsonl`` + ``qrels/train.tsv``) where the folder has them,
   plus structural pseudo-queries from the corpus and optional LLM-written ones
   (:mod:`embforge.adapt.corpus`);
2. **filter**: a pseudo pair is kept when the base model ranks its own passage among the top
   ``top_k`` of the whole corpus (Nomic's consistency filter); labelled pairs are kept as they are;
3. **hold back** a slice of the pairs (queries of the labelled pairs, else passages of the pseudo
   pairs) that is never trained on: it chooses the merge weight below;
4. **mine** positive-aware hard negatives from the corpus (the teacher's ranking where one is
   given, else the base model's; none scoring above 0.95 x the positive);
5. **plan**: the step time is measured on a real batch, and the training steps fill what the
   ``minutes`` budget leaves after the other steps (capped at ``max_epochs``); where the budget
   holds several such runs, up to ``max_runs`` of them are planned;
6. **train**: InfoNCE over in-batch + mined negatives (+ distillation from ``teacher``), one run
   per seed (``seed``, ``seed + 1``, ...: other batches, other warm-up noise), the runs averaged
   into one model (a uniform soup);
7. **merge** the trained model with the base, ``(1 - w)·base + w·tuned``, scored on the
   held-back slice at w = 0, 1, 0.5 and one refinement (:func:`search_weight`); the largest w
   within ``tolerance`` nDCG@10 points of the best is kept (differences smaller than that are
   noise on a slice of ~100 queries; the base comes back where training hurt);
8. **report**: ``OUT/final`` (loads with ``Embedder.load``), ``OUT/report.json``, ``report.md``
   and ``report.png``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embforge.adapt.corpus import AdaptData, Pair, llm_queries, pseudo_queries, read_folder
from embforge.atomic import atomic_write
from embforge.errors import ConfigError, DataError

SEARCH_ENCODES = 3  # corpus encodings the merge-weight search makes (w = 1, 0.5 and one refinement)
MAX_RUNS = 4  # training runs averaged into the soup, at most, where the budget holds them


@dataclass
class AdaptSettings:
    model: str
    data: str
    teacher: str | None = None
    minutes: float = 30.0
    steps: int | None = None  # training steps; None: as many as the budget allows (measured)
    runs: int | None = None  # runs (seeds) averaged; None: as many as the budget holds, <= MAX_RUNS (1 with steps)
    seed: int = 0
    batch_size: int = 32
    num_negatives: int = 1
    max_negative_ratio: float = 0.95  # mining: no negative scoring above this x the positive's score
    lr: float = 5e-5
    temperature: float = 0.05
    max_seq_len: int | None = None
    top_k: int = 2  # consistency filter: the passage among the base model's top k
    holdout: float = 0.1  # the held-back fraction (at least 20, at most 300 queries or passages)
    max_epochs: float = 3.0
    # merge: nDCG@10 points below the best that still count as the best (the slice's noise: on
    # MLQuestions, blends the slice preferred by < 1 point scored 1.7 points lower on held-out queries)
    tolerance: float = 1.0
    eval_corpus: int = 3000  # passages the held-back slice is searched over (its own positives included)
    pseudo: bool = False  # also train on pseudo-queries where labelled pairs exist (measured to hurt: docs/adapt.md)
    labelled_share: float = 0.5  # of every batch, where both kinds exist (at most half the labelled rows)
    llm_endpoint: str | None = None
    llm_model: str | None = None
    llm_queries: int = 0

    def validate(self) -> None:
        if self.minutes <= 0 or self.batch_size < 2 or self.num_negatives < 0 or not 0 < self.holdout < 0.5:
            raise ConfigError("adapt: minutes > 0, batch_size >= 2, num_negatives >= 0 and 0 < holdout < 0.5")
        if not 0 < self.labelled_share < 1 or self.max_negative_ratio <= 0:
            raise ConfigError("adapt: 0 < labelled_share < 1 and max_negative_ratio > 0")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("adapt: --steps must be >= 1")
        if self.runs is not None and self.runs < 1:
            raise ConfigError("adapt: --runs must be >= 1")
        if self.llm_queries and not (self.llm_endpoint and self.llm_model):
            raise ConfigError("adapt: --llm-queries needs --llm-endpoint and --llm-model")


@dataclass
class Work:
    """``OUT/work``: what the finished steps left, read back on a re-run."""

    folder: Path
    state: dict = field(default_factory=dict)

    def load(self, settings: AdaptSettings) -> None:
        path = self.folder / "state.json"
        wanted = dataclasses.asdict(settings)
        if path.is_file():
            self.state = json.loads(path.read_text(encoding="utf-8"))
            if self.state.get("settings") != wanted:
                changed = sorted(k for k in wanted if self.state.get("settings", {}).get(k) != wanted[k])
                raise ConfigError(
                    f"{path.parent.parent}: holds an adapt run with other settings ({', '.join(changed)}); "
                    "re-run with the same ones to continue it, or choose another --output"
                )
        else:
            self.state = {"settings": wanted}
            self.save()

    def save(self) -> None:
        text = json.dumps(self.state, indent=1) + "\n"
        atomic_write(self.folder / "state.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_pairs(self, name: str, rows: list[dict]) -> Path:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return atomic_write(self.folder / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def read_pairs(self, name: str) -> list[dict]:
        path = self.folder / name
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


def _say(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[adapt] {text}")


# ---------------------------------------------------------------------------- steps
class Corpus:
    """The corpus's distinct texts (a copy under two ids is one passage) and the base model's embeddings."""

    def __init__(self, data: AdaptData):
        self.texts = list(dict.fromkeys(data.texts))
        index = {t: i for i, t in enumerate(self.texts)}
        self.of_id = {d: index[t] for d, t in zip(data.ids, data.texts)}


def side_prompt(model, side: str) -> str | None:
    """The model's prompt name for ``side`` (``query`` / ``document``) where it has one, else None."""
    return side if side in getattr(model, "prompts", {}) else None


def _encode(model, texts: list[str], side: str, batch_size: int = 64, show: bool = True) -> np.ndarray:
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
    q_emb = _encode(model, queries, "query", batch_size, show=False)
    if d_emb is None:
        d_emb = _encode(model, [corpus.texts[i] for i in eval_ids], "document", batch_size, show=False)
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


# ---------------------------------------------------------------------------- the command
def adapt(settings: AdaptSettings, output: str | Path) -> dict:
    """Run every step (skipping finished ones); return the report (also written to ``OUT/report.json``)."""
    from embforge.data.embedding_cache import encode_cached
    from embforge.data.mining import Miner, MiningConfig
    from embforge.models.embedder import Embedder
    from embforge.models.merging import merge
    from embforge.train.stages import run_recipe

    settings.validate()
    t0 = time.perf_counter()
    output = Path(output).resolve()
    work = Work(output / "work")
    work.folder.mkdir(parents=True, exist_ok=True)
    work.load(settings)
    state = work.state
    state["sessions"] = state.get("sessions", 0) + 1
    data = read_folder(settings.data)
    corpus = Corpus(data)
    _say(f"corpus: {len(data.ids)} passages ({len(corpus.texts)} distinct), {len(data.labelled)} labelled pairs")
    overrides = {"max_seq_len": settings.max_seq_len} if settings.max_seq_len else {}
    base = Embedder.load(settings.model, device="cpu", **overrides)
    cache = work.folder / "cache"

    # 1-3: pairs, filter, hold back
    if "pairs" not in state:
        start = time.perf_counter()
        corpus_emb, _ = encode_cached(base, corpus.texts, cache_dir=cache, prompt_name=side_prompt(base, "document"))
        state["encode_texts_per_s"] = len(corpus.texts) / max(time.perf_counter() - start, 1e-6)
        counts: dict[str, int] = {"labelled": len(data.labelled)}
        made: list[Pair] = []
        if settings.pseudo or not data.labelled:
            made = pseudo_queries(data, settings.seed)
            if settings.llm_queries:
                llm_file = work.folder / "llm.jsonl"
                if llm_file.is_file():
                    made += [Pair(**r) for r in work.read_pairs("llm.jsonl")]
                else:
                    written = llm_queries(
                        data, settings.llm_endpoint, settings.llm_model, settings.llm_queries, settings.seed
                    )
                    work.write_pairs("llm.jsonl", [dataclasses.asdict(p) for p in written])
                    made += written
            for p in made:
                counts[f"made: {p.kind}"] = counts.get(f"made: {p.kind}", 0) + 1
        if not data.labelled and not made:
            raise DataError(f"{settings.data}: no labelled pairs and no passage long enough for a pseudo-query")
        labelled, made, held = hold_back(data.labelled, made, corpus, settings)
        train = list(labelled)
        if made:
            q_emb = _encode(base, [p.query for p in made], "query")
            own = np.array([corpus.of_id[p.doc_id] for p in made])
            keep = consistency_filter(q_emb, corpus_emb, own, settings.top_k)
            for p, k in zip(made, keep):
                if k:
                    counts[f"kept: {p.kind}"] = counts.get(f"kept: {p.kind}", 0) + 1
            train += [p for p, k in zip(made, keep) if k]
        if not train:
            raise DataError(
                f"{settings.data}: no training pair survived (no labelled pairs, no consistent pseudo-query)"
            )
        work.write_pairs("held.jsonl", [{"query": p.query, "doc": corpus.of_id[p.doc_id]} for p in held])
        work.write_pairs("pairs.jsonl", [dataclasses.asdict(p) for p in train])
        state["pairs"] = {**counts, "train": len(train), "held back": len(held)}
        work.save()
    _say(f"pairs: {state['pairs']}")
    train = [Pair(**r) for r in work.read_pairs("pairs.jsonl")]
    held = work.read_pairs("held.jsonl")

    # 4: mine
    if "mined" not in state:
        teacher = Embedder.load(settings.teacher, device="cpu") if settings.teacher else base
        documents = side_prompt(teacher, "document")
        corpus_emb, _ = encode_cached(teacher, corpus.texts, cache_dir=cache, prompt_name=documents)
        cfg = MiningConfig(
            num_negatives=max(1, settings.num_negatives),
            range_max=30,
            max_score_ratio=settings.max_negative_ratio,
            seed=settings.seed,
        )
        cfg.query_prompt_name, cfg.document_prompt_name = side_prompt(teacher, "query"), documents
        miner = Miner(teacher, corpus.texts, cfg, corpus_emb=corpus_emb)
        result = miner.mine([p.query for p in train], [[p.positive, data.text_of(p.doc_id)] for p in train])
        files: dict[str, list[dict]] = {"labelled": [], "pseudo": []}
        short = 0
        for p, negs in zip(train, result.negatives):
            if len(negs) < settings.num_negatives:
                short += 1  # counted in the report, never silently dropped
                continue
            row = {"query": p.query, "positive": p.positive, "negatives": negs[: settings.num_negatives]}
            files["labelled" if p.kind == "labelled" else "pseudo"].append(row)
        for name, rows in files.items():
            if rows:
                work.write_pairs(f"train-{name}.jsonl", rows)
        state["mined"] = {
            "files": {n: f"train-{n}.jsonl" for n, rows in files.items() if rows},
            "rows": {n: len(rows) for n, rows in files.items()},
            "dropped: fewer negatives than num_negatives": short,
            "dropped by the positive-aware filter": dict(result.dropped),
        }
        work.save()
    mined = state["mined"]
    _say(f"mined: {mined['rows']}")
    if not mined["files"]:
        raise DataError(
            f"no training pair kept a mined negative ({mined['dropped by the positive-aware filter']}); "
            "lower --num-negatives or raise --max-negative-ratio"
        )

    # 5: plan
    weights = batch_shares(mined["rows"], settings)
    if "plan" not in state:
        probe = train_recipe(settings, output, 10, mined["files"], weights, base.prompts)
        rows = work.read_pairs(next(iter(mined["files"].values())))
        step_s = measure_step_s(base, rows, settings, probe)
        eval_texts = min(len(corpus.texts), settings.eval_corpus) + len(held)
        search_s = SEARCH_ENCODES * eval_texts / state["encode_texts_per_s"]
        left = settings.minutes * 60 - (time.perf_counter() - t0) - search_s - 30  # 30 s: saves and the report
        cap = int(settings.max_epochs * sum(mined["rows"].values()) / settings.batch_size)
        steps = settings.steps or int(max(10, min(cap, left / step_s)))
        runs = settings.runs or (1 if settings.steps else int(max(1, min(MAX_RUNS, left // (steps * step_s)))))
        state["plan"] = {
            "step_s": step_s,
            "steps": steps,
            "runs": runs,
            "epoch_cap": cap,
            "train_s_planned": runs * steps * step_s,
            "batch_shares": weights,
        }
        work.save()
    plan = state["plan"]
    _say(f"plan: {plan['runs']} run(s) of {plan['steps']} steps at {plan['step_s']:.2f} s (cap {plan['epoch_cap']})")

    # 6: train, one run per seed (each resumes from its checkpoints), averaged into the soup
    start = time.perf_counter()
    finals = []
    for run in range(plan["runs"]):
        recipe = train_recipe(settings, output, plan["steps"], mined["files"], weights, base.prompts, run)
        run_recipe(recipe, work.folder, resume=True)
        finals.append(Path(recipe.output_dir) / "final")
    tuned_dir = finals[0]
    if len(finals) > 1:
        tuned_dir = output / "train" / "soup"
        if not (tuned_dir / "merge.json").is_file():
            merge(finals, tuned_dir, weights=[1.0] * len(finals), show_progress=False)
    state.setdefault("train_s", time.perf_counter() - start)
    work.save()

    # 7: merge weight on the held-back slice
    rng = random.Random(settings.seed)
    held_docs = sorted({h["doc"] for h in held})
    held_set = set(held_docs)
    others = [i for i in range(len(corpus.texts)) if i not in held_set]
    eval_ids = held_docs + rng.sample(others, max(0, min(len(others), settings.eval_corpus - len(held_docs))))
    if "search" not in state:
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        tuned = Embedder.load(tuned_dir, device="cpu", **overrides)
        tuned_state = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
        probe = Embedder.load(tuned_dir, device="cpu", **overrides)
        base_docs, _ = encode_cached(base, corpus.texts, cache_dir=cache, prompt_name=side_prompt(base, "document"))

        def score(w: float) -> dict[str, float]:
            if w == 0.0:  # the base: its passage embeddings are cached
                scores = held_scores(base, held, corpus, eval_ids, 64, d_emb=base_docs[eval_ids])
            else:
                probe.load_state_dict(interpolate(base_state, tuned_state, w))
                scores = held_scores(probe, held, corpus, eval_ids, 64)
            _say(f"merge weight {w}: held-back nDCG@10 {scores['ndcg_at_10']:.2f}")
            return scores

        curve, chosen = search_weight(score, settings.tolerance)
        state["search"] = {"curve": curve, "chosen": chosen}
        work.save()
    chosen = state["search"]["chosen"]
    final = output / "final"
    if not (final / "merge.json").is_file():
        # the base written the way training writes its model (a packaged folder may hold other buffers)
        base_copy = base.save(work.folder / "base")
        merge([base_copy, tuned_dir], final, weights=[1 - chosen, chosen], show_progress=False)

    # 8: report
    report = {
        "model": settings.model,
        "data": settings.data,
        "mode": "supervised" if data.labelled else "corpus-only",
        "teacher": settings.teacher,
        "pairs": state["pairs"],
        "mined": mined["rows"],
        "plan": plan,
        "train_s": state["train_s"],
        "merge_weight": chosen,
        "held_back": {
            "queries": len({h["query"] for h in held}),
            "passages": len(eval_ids),
            "base": state["search"]["curve"]["0.0"],
            "trained": state["search"]["curve"]["1.0"],
            "final": state["search"]["curve"][str(chosen)],
        },
        "curve": state["search"]["curve"],
        "sessions": state["sessions"],
        "wall_s_this_session": time.perf_counter() - t0,
    }
    write_report(report, output)
    return report


def write_report(report: dict, output: Path) -> None:
    from embforge.train.plots import plot_adapt_report

    text = json.dumps(report, indent=1) + "\n"
    atomic_write(output / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    h = report["held_back"]
    lines = [
        f"# embforge adapt: {report['model']} on {report['data']} ({report['mode']})",
        "",
        f"Held-back slice: {h['queries']} queries over {h['passages']} passages (never trained on).",
        "",
        "| model | nDCG@10 | recall@10 | MRR@10 |",
        "|---|---|---|---|",
    ]
    for name, key in (
        ("base", "base"),
        ("trained (w = 1)", "trained"),
        (f"final (w = {report['merge_weight']})", "final"),
    ):
        s = h[key]
        lines.append(f"| {name} | {s['ndcg_at_10']:.2f} | {s['recall_at_10']:.2f} | {s['mrr_at_10']:.2f} |")
    lines += ["", f"Pairs: {report['pairs']}", f"Plan: {report['plan']}", ""]
    md = "\n".join(lines)
    atomic_write(output / "report.md", lambda tmp: tmp.write_text(md, encoding="utf-8"))
    plot_adapt_report(h, report["curve"], report["merge_weight"], output / "report.png")
