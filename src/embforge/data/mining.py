"""Hard-negative mining with a teacher model, positive-aware (NV-Embed-v2's TopK-PercPos).

For each (query, positives) the teacher ranks a corpus; candidates are taken in rank
order, skipping the positives (all of them) and texts identical to a positive or to the
query, then the positive-aware filters: drop a candidate the teacher scores above
``max_score_ratio`` × the positive's score (near-copies are most likely unlabelled
positives; for a negative positive score, above ``pos − (1 − ratio)·|pos|``, see
:func:`ratio_ceiling`), or above ``positive score − margin``. From the ranks ``[range_min,
range_max)`` that survive, keep the best ``num_negatives`` or a seeded random sample.

Queries are processed ``chunk_size`` at a time against a FAISS index (exact inner
product, or IVF / HNSW for large corpora): no query × corpus matrix is ever held, and
:func:`mine_file` streams input and output, so memory depends on the corpus and the
chunk, not on the number of queries. Every skipped candidate and every query left with
too few negatives is counted by reason.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embforge.atomic import atomic_write
from embforge.data.embedding_cache import encode_cached, encode_normalised, load_cached, store_cached
from embforge.data.io import iter_jsonl
from embforge.data.records import DataReport, OnBadRecord, read_records
from embforge.data.sharding import chunked, rank_shards, sum_over_ranks
from embforge.errors import DataError


@dataclass
class MiningConfig:
    num_negatives: int = 7
    range_min: int = 0  # skip candidates ranked <= range_min (rank among non-positive candidates)
    range_max: int = 50  # look no deeper than this rank (same ranking)
    max_score_ratio: float | None = 0.95  # TopK-PercPos: drop scores above ratio × positive score
    margin: float | None = None  # drop scores above positive score − margin
    sampling: Literal["top", "random"] = "top"
    seed: int = 0
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    chunk_size: int = 4096  # queries searched at once
    batch_size: int = 64
    query_prompt_name: str | None = None
    document_prompt_name: str | None = None
    on_bad_record: OnBadRecord = "error"  # a bad input line: error naming file:line, or skip and count it


@dataclass
class MiningResult:
    negatives: list[list[str]]  # per query, best-ranked first
    scores: list[list[float]]  # teacher scores of the negatives
    positive_scores: list[float]
    dropped: Counter = field(default_factory=Counter)  # reason -> count


class PromptedTeacher:
    """A teacher whose prompt names stand for given prompt texts (e.g. a task instruction through a
    model's template), so :class:`Miner` embeds queries and candidates as training does.

    ``prompts``: name -> text ("" for none, None for the teacher's default prompt).
    """

    def __init__(self, teacher: Any, prompts: dict[str, str | None]):
        self.teacher, self.prompts = teacher, prompts

    def encode(self, texts: list[str], *, prompt_name: str | None = None, batch_size: int = 64) -> np.ndarray:
        return self.teacher.encode(texts, prompt=self.prompts.get(prompt_name), batch_size=batch_size)


def build_index(corpus_emb: np.ndarray, kind: str, seed: int = 0):
    """FAISS inner-product index over L2-normalised embeddings."""
    import faiss

    d = corpus_emb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, min(4096, int(4 * np.sqrt(len(corpus_emb)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).permutation(len(corpus_emb))[: max(nlist * 40, 10_000)]
        index.train(corpus_emb[sample])
        index.nprobe = min(nlist, 32)
    index.add(corpus_emb)
    return index


def ratio_ceiling(pos_score: float, ratio: float) -> float:
    """The highest score a negative may have under the ratio filter: ``pos − (1 − ratio)·|pos|``.

    For a positive score ≥ 0 this is the paper's ``ratio × pos``. For a negative one,
    ``ratio × pos`` would lie *above* the positive (keeping candidates the teacher prefers to
    it); this rule keeps the same relative gap below the positive for either sign.
    """
    return pos_score - (1.0 - ratio) * abs(pos_score)


def _select(
    query: str,
    positives: list[str],
    pos_score: float,
    ids: np.ndarray,
    scores: np.ndarray,
    corpus: list[str],
    cfg: MiningConfig,
    rng: random.Random,
    dropped: Counter,
) -> tuple[list[str], list[float]]:
    own = set(positives)
    window: list[tuple[str, float]] = []
    seen: set[str] = set()
    rank = 0
    for idx, score in zip(ids, scores):
        if idx < 0:
            break
        text = corpus[idx]
        if text in own:
            dropped["positive or copy of it"] += 1
            continue
        if text == query:
            dropped["identical to the query"] += 1
            continue
        if text in seen:
            dropped["duplicate candidate"] += 1
            continue
        seen.add(text)
        if rank >= cfg.range_max:
            break
        rank += 1
        if cfg.max_score_ratio is not None and score > ratio_ceiling(pos_score, cfg.max_score_ratio):
            dropped[f"above {cfg.max_score_ratio} x positive score"] += 1
            continue
        if cfg.margin is not None and score > pos_score - cfg.margin:
            dropped[f"within margin {cfg.margin} of the positive"] += 1
            continue
        if rank <= cfg.range_min:
            dropped[f"rank <= range_min {cfg.range_min}"] += 1
            continue
        window.append((text, float(score)))
        if cfg.sampling == "top" and len(window) == cfg.num_negatives:
            break
    if cfg.sampling == "random" and len(window) > cfg.num_negatives:
        window = sorted(rng.sample(window, cfg.num_negatives), key=lambda x: -x[1])
    if len(window) < cfg.num_negatives:
        dropped["queries with too few negatives"] += 1
    return [t for t, _ in window], [s for _, s in window]


class Miner:
    """Mines chunks of queries against one corpus (embedded once, optionally cached on disk)."""

    def __init__(
        self,
        teacher: Any,
        corpus: list[str],
        cfg: MiningConfig,
        cache_dir: str | Path | None = None,
        corpus_emb: np.ndarray | None = None,
    ):
        if not corpus:
            raise DataError("the mining corpus is empty")
        self.teacher, self.corpus, self.cfg = teacher, corpus, cfg
        if corpus_emb is not None:
            self.corpus_emb, self.from_cache = corpus_emb, False
        else:
            self.corpus_emb, self.from_cache = encode_cached(
                teacher, corpus, cache_dir=cache_dir, prompt_name=cfg.document_prompt_name, batch_size=cfg.batch_size
            )
        self.index = build_index(self.corpus_emb, cfg.index, cfg.seed)
        self.position = {t: i for i, t in enumerate(corpus)}  # first occurrence of each text
        self.rng = random.Random(cfg.seed)
        self.dropped: Counter = Counter()

    def _encode(self, texts: list[str], prompt_name: str | None) -> np.ndarray:
        return encode_normalised(self.teacher, texts, prompt_name, self.cfg.batch_size)

    def mine(self, queries: list[str], positives: list[list[str]]) -> MiningResult:
        """Negatives for one chunk of queries (any length; searched ``chunk_size`` at a time)."""
        out = MiningResult([], [], [], self.dropped)
        for start in range(0, len(queries), self.cfg.chunk_size):
            q_texts, p_lists = (
                queries[start : start + self.cfg.chunk_size],
                positives[start : start + self.cfg.chunk_size],
            )
            q_emb = self._encode(q_texts, self.cfg.query_prompt_name)
            # the positive's score: from the corpus embeddings when it is there, else encoded here
            missing = sorted({p for ps in p_lists for p in ps if p not in self.position})
            extra = dict(zip(missing, self._encode(missing, self.cfg.document_prompt_name))) if missing else {}

            # several positives: the lowest score is the conservative reference for the filters
            pos_scores = [
                min(
                    float(q_emb[i] @ (self.corpus_emb[self.position[p]] if p in self.position else extra[p]))
                    for p in ps
                )
                for i, ps in enumerate(p_lists)
            ]
            depth = min(len(self.corpus), self.cfg.range_max + max(len(p) for p in p_lists) + 16)
            scores, ids = self.index.search(q_emb, depth)  # (chunk, depth)
            for i, q in enumerate(q_texts):
                negs, neg_scores = _select(
                    q, p_lists[i], pos_scores[i], ids[i], scores[i], self.corpus, self.cfg, self.rng, self.dropped
                )
                out.negatives.append(negs)
                out.scores.append(neg_scores)
                out.positive_scores.append(pos_scores[i])
        return out


def mine_hard_negatives(
    teacher: Any,
    queries: list[str],
    positives: list[list[str]],
    corpus: list[str],
    *,
    num_negatives: int = 3,
    skip_top: int = 0,
    search_depth: int = 50,
    max_score_ratio: float | None = 0.95,
    cache_dir: str | Path | None = None,
    **options,
) -> MiningResult:
    """In-memory mining (see :class:`MiningConfig` for ``options``)."""
    cfg = MiningConfig(
        num_negatives=num_negatives,
        range_min=skip_top,
        range_max=search_depth,
        max_score_ratio=max_score_ratio,
        **options,
    )
    return Miner(teacher, corpus, cfg, cache_dir).mine(queries, positives)


# ---------------------------------------------------------------------------- files
def read_corpus(path: Path, field_name: str = "text") -> list[str]:
    """Corpus texts from .txt (a line each), JSONL (``field_name``) or a BEIR corpus.jsonl (title + text)."""
    from embforge.data.io import read_texts

    if path.suffix == ".jsonl":
        texts = []
        for lineno, obj in iter_jsonl(path):
            if "_id" in obj and "text" in obj:
                texts.append((str(obj.get("title") or "") + " " + obj["text"]).strip())
            elif field_name in obj and isinstance(obj[field_name], str):
                texts.append(obj[field_name])
            else:
                raise DataError(f"{path}:{lineno}: missing field {field_name!r}")
        return texts
    return read_texts(path)


def corpus_from_inputs(inputs: list[Path], on_bad_record: OnBadRecord = "error") -> list[str]:
    """Every distinct positive and existing negative of the input files, in order of appearance."""
    seen: dict[str, None] = {}
    for path in inputs:
        for _, _, record in read_records(path, DataReport(), "records", on_bad_record):
            seen.update(dict.fromkeys(record.positives + record.negatives))
    return list(seen)


def distributed_corpus_embeddings(
    teacher: Any, corpus: list[str], cfg: MiningConfig, cache_dir: str | Path | None, rank: int, world: int
) -> tuple[np.ndarray, bool]:
    """Corpus embeddings computed by ``world`` processes (a contiguous slice each, then all_gather)."""
    if world == 1:
        return encode_cached(
            teacher, corpus, cache_dir=cache_dir, prompt_name=cfg.document_prompt_name, batch_size=cfg.batch_size
        )
    import torch.distributed as dist

    cached = load_cached(cache_dir, teacher, corpus, cfg.document_prompt_name)
    hits = [None] * world
    dist.all_gather_object(hits, cached is not None)
    if all(hits):
        return cached, True
    lo, hi = rank * len(corpus) // world, (rank + 1) * len(corpus) // world
    part = encode_normalised(teacher, corpus[lo:hi], cfg.document_prompt_name, cfg.batch_size) if hi > lo else None
    parts = [None] * world
    dist.all_gather_object(parts, part)
    emb = np.concatenate([p for p in parts if p is not None])
    if rank == 0:
        store_cached(cache_dir, teacher, corpus, cfg.document_prompt_name, emb)
    dist.barrier()
    return emb, False


def mine_shards(
    teacher: Any,
    inputs: list[Path],
    outputs: list[Path],
    cfg: MiningConfig,
    *,
    corpus: list[str] | None = None,
    cache_dir: str | Path | None = None,
    keep_incomplete: bool = False,
    rank: int = 0,
    world: int = 1,
    progress=None,
) -> dict:
    """Mine every input shard into the matching output shard; shard i is done by rank ``i % world``.

    The corpus (default: every distinct positive and negative of all inputs) is embedded
    once, split across ranks. Each shard is streamed ``cfg.chunk_size`` queries at a time
    and its output written atomically. Returns the summary merged over all ranks.
    """
    my_shards = rank_shards(inputs, outputs, rank, world)  # checks the shard counts before the corpus is embedded
    corpus = corpus if corpus is not None else corpus_from_inputs(inputs, cfg.on_bad_record)
    if not corpus:
        raise DataError("the mining corpus is empty")
    corpus_emb, from_cache = distributed_corpus_embeddings(teacher, corpus, cfg, cache_dir, rank, world)
    miner = Miner(teacher, corpus, cfg, corpus_emb=corpus_emb)
    stats: Counter = Counter()
    report = DataReport()
    for input_path, output_path in my_shards:

        def write(tmp: Path, input_path=input_path) -> None:
            records = read_records(input_path, report, "records", cfg.on_bad_record)
            with tmp.open("w", encoding="utf-8") as f:
                for chunk in chunked(((obj, record.positives) for _, obj, record in records), cfg.chunk_size):
                    result = miner.mine([o["query"] for o, _ in chunk], [p for _, p in chunk])
                    for (obj, _), negs, scores, pos_score in zip(
                        chunk, result.negatives, result.scores, result.positive_scores
                    ):
                        if len(negs) < cfg.num_negatives and not keep_incomplete:
                            stats["records dropped: too few negatives"] += 1
                            continue
                        out = {
                            **obj,
                            "negatives": negs,
                            "negative_scores": [round(s, 6) for s in scores],
                            "positive_score": round(pos_score, 6),
                        }
                        f.write(json.dumps(out, ensure_ascii=False) + "\n")
                        stats["records written"] += 1
                    if progress is not None:
                        progress(len(chunk))

        atomic_write(output_path, write)
    stats["records read"] = report.read["records"]
    stats.update({f"records skipped: {reason}": n for reason, n in report.skipped.get("records", {}).items()})
    records, dropped = sum_over_ranks(stats, miner.dropped, world=world)
    return {
        "corpus_size": len(corpus),
        "corpus_embeddings_from_cache": from_cache,
        "shards": len(inputs),
        "records": dict(records),
        "candidates_dropped": dict(dropped),
    }


def mine_file(
    teacher: Any,
    input_path: Path,
    output_path: Path,
    cfg: MiningConfig,
    *,
    corpus: list[str] | None = None,
    cache_dir: str | Path | None = None,
    keep_incomplete: bool = False,
    progress=None,
) -> dict:
    """Stream one JSONL file (query and positive/positives) to ``output_path`` with mined negatives.

    Output lines keep the input fields and set ``negatives``, ``negative_scores``, ``positive_score``.
    """
    return mine_shards(
        teacher,
        [input_path],
        [output_path],
        cfg,
        corpus=corpus,
        cache_dir=cache_dir,
        keep_incomplete=keep_incomplete,
        progress=progress,
    )
