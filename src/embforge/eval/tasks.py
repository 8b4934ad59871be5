"""MTEB-style tasks on local files: loaders and evaluation (the schema: :mod:`embforge.eval.task_config`).

A task file (YAML) lists tasks::

    data_root: ../../shared/data          # relative to this file; --data-root overrides
    tasks:
      - {name: SICK-R, type: sts, path: sick/sick.jsonl,
         fields: {score: relatedness_score}}
      - {name: MLQuestions, type: retrieval, path: mlquestions_dev, split: dev}

Every task takes any ``model`` with ``encode(texts, batch_size=..., prompt_name=...)``
returning an (N, D) array. Protocols follow MTEB: retrieval ranks the whole corpus by
cosine (documents are ``(title + " " + text).strip()``); STS is the Spearman correlation
of cosine similarity; classification fits a logistic regression on ``samples_per_label``
undersampled training embeddings per experiment; pair classification is the best AP over
four similarities; clustering is the V-measure of k-means; reranking is MAP of cosine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from embforge.data.io import load_beir, read_jsonl, require_file
from embforge.errors import ConfigError, DataError
from embforge.eval import metrics
from embforge.eval.task_config import MAIN_SCORE, TaskConfig
from embforge.modeling.head import instruction_prompt_of, prompts_of
from embforge.vectors import l2_normalise


# ---------------------------------------------------------------------------- encoding
def _encode(model: Any, texts: list[str], prompt: dict[str, str], batch_size: int) -> np.ndarray:
    """``model.encode`` with ``prompt`` = {} | {"prompt_name": name} | {"prompt": text}."""
    emb = np.asarray(model.encode(texts, batch_size=batch_size, **prompt), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"model.encode returned shape {emb.shape} for {len(texts)} texts")
    return emb


def _side_prompt(model: Any, explicit: str | None, side: str) -> str | None:
    """The task's prompt for a side, else the model's own ``query``/``document`` prompt."""
    if explicit is not None:
        return explicit
    return side if side in prompts_of(model) else None


def _instruction(model: Any, task: TaskConfig) -> dict[str, str]:
    """The task's instruction as the model formats it (NV-Embed), if both exist."""
    prompt = instruction_prompt_of(model, task.instruction) if task.instruction is not None else None
    return {"prompt": prompt} if prompt is not None else {}


def _named(name: str | None) -> dict[str, str]:
    return {"prompt_name": name} if name is not None else {}


def _query_prompt(model: Any, task: TaskConfig) -> dict[str, str]:
    """Queries of asymmetric tasks: the instruction, else the query prompt. Documents get no instruction."""
    return _instruction(model, task) or _named(_side_prompt(model, task.query_prompt_name, "query"))


def _document_prompt(model: Any, task: TaskConfig) -> dict[str, str]:
    return _named(_side_prompt(model, task.document_prompt_name, "document"))


def _symmetric_prompt(model: Any, task: TaskConfig) -> dict[str, str]:
    """Both sides of symmetric tasks (STS, classification, clustering, pairs): the instruction, else the prompt."""
    return _instruction(model, task) or _named(task.prompt_name)


def _rows(task: TaskConfig, path: Path, roles: tuple[str, ...]) -> list[dict]:
    columns = tuple(task.column(r) for r in roles)
    return read_jsonl(path, fields=columns)


# ---------------------------------------------------------------------------- retrieval
def search(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    doc_ids: list[str],
    top_k: int,
    chunk: int = 256,
    binary: bool = False,
) -> list[list[str]]:
    """Exact cosine search, ``chunk`` queries at a time (never a full Q×N matrix).

    With ``binary``, both sides are reduced to their signs packed 8 per byte and ranked
    by Hamming distance (:func:`embforge.quantization.hamming_distances`), 32x smaller.
    """
    from embforge.quantization import hamming_distances, quantize_embeddings

    if binary:
        q, c = quantize_embeddings(query_emb, "ubinary"), quantize_embeddings(corpus_emb, "ubinary")
    else:
        q, c = l2_normalise(query_emb), l2_normalise(corpus_emb)
    # rank of each id in ascending string order: trec_eval breaks ties by id, descending
    tie_key = np.empty(len(doc_ids), dtype=np.int64)
    tie_key[np.argsort(np.array(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    ranked: list[list[str]] = []
    for start in range(0, len(q), chunk):
        part = q[start : start + chunk]
        scores = -hamming_distances(part, c).astype(np.float32) if binary else part @ c.T  # (chunk, N)
        for row in metrics.rank_top_k(scores, top_k, tie_key):
            ranked.append([doc_ids[i] for i in row])
    return ranked


def eval_retrieval(model: Any, task: TaskConfig, path: Path, batch_size: int) -> dict[str, float]:
    corpus, queries, qrels = load_beir(path, task.split)
    doc_ids = list(corpus)
    q_ids = list(queries)
    q_emb = _encode(model, [queries[q] for q in q_ids], _query_prompt(model, task), batch_size)
    d_emb = _encode(model, [corpus[d] for d in doc_ids], _document_prompt(model, task), batch_size)
    ranked = search(q_emb, d_emb, doc_ids, top_k=max(task.k_values))
    return metrics.retrieval_scores(dict(zip(q_ids, ranked)), qrels, task.k_values)


def eval_retrieval_dims(
    model: Any, task: TaskConfig, path: Path, dims: list[int], batch_size: int = 32
) -> dict[str, dict[str, float]]:
    """A Matryoshka curve: nDCG@10 of float and of binary (Hamming) search at each of ``dims``.

    Texts are encoded once at full size; the first d components of an L2-normalised
    embedding, re-normalised, are exactly ``encode(dimensions=d)`` under either
    ``matryoshka_rule`` (truncation commutes with positive scaling), and their signs are
    the binary codes.

    Returns:
        ``{"768": {"float": ..., "binary": ...}, "64": {...}}`` (fractions in [0, 1]).
    """
    corpus, queries, qrels = load_beir(path, task.split)
    doc_ids, q_ids = list(corpus), list(queries)
    q_emb = _encode(model, [queries[q] for q in q_ids], _query_prompt(model, task), batch_size)
    d_emb = _encode(model, [corpus[d] for d in doc_ids], _document_prompt(model, task), batch_size)
    curve: dict[str, dict[str, float]] = {}
    for d in dims:
        if not 1 <= d <= q_emb.shape[1]:
            raise ConfigError(f"dimension {d} is outside [1, {q_emb.shape[1]}]")
        curve[str(d)] = {}
        for kind in ("float", "binary"):
            ranked = search(q_emb[:, :d], d_emb[:, :d], doc_ids, top_k=10, binary=kind == "binary")
            curve[str(d)][kind] = metrics.retrieval_scores(dict(zip(q_ids, ranked)), qrels, (10,))["ndcg_at_10"]
    return curve


# ---------------------------------------------------------------------------- STS
def eval_sts(model: Any, task: TaskConfig, path: Path, batch_size: int) -> dict[str, float]:
    rows = _rows(task, path, ("sentence1", "sentence2", "score"))
    s1 = [r[task.column("sentence1")] for r in rows]
    s2 = [r[task.column("sentence2")] for r in rows]
    gold = np.array([float(r[task.column("score")]) for r in rows])
    emb = _encode(model, s1 + s2, _symmetric_prompt(model, task), batch_size)  # one pass: shared batching
    a, b = emb[: len(rows)], emb[len(rows) :]
    sims = metrics.pair_similarities(a, b)
    out = {}
    for name in ("cosine", "manhattan", "euclidean", "dot"):
        out[f"{name}_spearman"] = metrics.spearman(sims[name], gold)
        out[f"{name}_pearson"] = metrics.pearson(sims[name], gold)
    return out


# ---------------------------------------------------------------------------- classification
def undersample(labels: list, samples_per_label: int, idxs: np.ndarray, seed: int) -> np.ndarray:
    """MTEB's undersampling: shuffle ``idxs`` in place, keep the first n per label.

    Like MTEB, every experiment shuffles the previous experiment's order again with a
    *fresh* ``RandomState(seed)``, so the draws depend only on the seed and the row order.
    """
    np.random.RandomState(seed).shuffle(idxs)
    counts: dict[Any, int] = {}
    keep = []
    for i in idxs:
        if counts.get(labels[i], 0) < samples_per_label:
            keep.append(i)
            counts[labels[i]] = counts.get(labels[i], 0) + 1
    return np.array(keep)


def eval_classification(
    model: Any, task: TaskConfig, path: Path, train_path: Path, batch_size: int
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    text_col, label_col = task.column("text"), task.column("label")
    train = _rows(task, train_path, ("text", "label"))
    test = _rows(task, path, ("text", "label"))
    y_train = [r[label_col] for r in train]
    y_test = [r[label_col] for r in test]
    test_emb = _encode(model, [r[text_col] for r in test], _symmetric_prompt(model, task), batch_size)
    idxs = np.arange(len(train))
    train_cache: dict[int, np.ndarray] = {}  # embed each training text at most once
    scores: dict[str, list[float]] = {"accuracy": [], "f1": []}
    for _ in range(task.n_experiments):
        chosen = undersample(y_train, task.samples_per_label, idxs, task.seed)
        todo = [int(i) for i in chosen if int(i) not in train_cache]
        if todo:
            for i, e in zip(
                todo, _encode(model, [train[i][text_col] for i in todo], _symmetric_prompt(model, task), batch_size)
            ):
                train_cache[i] = e
        x = np.stack([train_cache[int(i)] for i in chosen])
        clf = LogisticRegression(random_state=task.seed, max_iter=100)
        clf.fit(x, [y_train[i] for i in chosen])
        pred = clf.predict(test_emb)
        scores["accuracy"].append(accuracy_score(y_test, pred))
        scores["f1"].append(f1_score(y_test, pred, average="macro"))
    return {k: float(np.mean(v)) for k, v in scores.items()}


# ---------------------------------------------------------------------------- pair classification
def eval_pair_classification(model: Any, task: TaskConfig, path: Path, batch_size: int) -> dict[str, float]:
    rows = _rows(task, path, ("sentence1", "sentence2", "label"))
    labels = np.array([int(r[task.column("label")]) for r in rows])
    if not set(np.unique(labels)) <= {0, 1}:
        raise DataError(f"{path}: pair classification labels must be 0/1, got {sorted(set(labels.tolist()))}")
    emb = _encode(
        model,
        [r[task.column("sentence1")] for r in rows] + [r[task.column("sentence2")] for r in rows],
        _symmetric_prompt(model, task),
        batch_size,
    )
    a, b = emb[: len(rows)], emb[len(rows) :]
    out: dict[str, float] = {}
    for name, sims in metrics.pair_similarities(a, b).items():
        out[f"{name}_ap"] = metrics.average_precision(labels, sims)
        out[f"{name}_accuracy"], _ = metrics.best_threshold_accuracy(sims, labels)
    out["max_ap"] = max(out[f"{n}_ap"] for n in ("cosine", "dot", "euclidean", "manhattan"))
    return out


# ---------------------------------------------------------------------------- clustering
def eval_clustering(model: Any, task: TaskConfig, path: Path, batch_size: int) -> dict[str, float]:
    from sklearn.cluster import MiniBatchKMeans

    rows = _rows(task, path, ("text", "label"))
    labels = [r[task.column("label")] for r in rows]
    emb = _encode(model, [r[task.column("text")] for r in rows], _symmetric_prompt(model, task), batch_size)
    n_clusters = len(set(labels))
    scores = []
    for i in range(task.n_experiments):
        km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=500, n_init="auto", random_state=task.seed + i)
        scores.append(metrics.v_measure(labels, km.fit_predict(emb)))
    return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}


# ---------------------------------------------------------------------------- reranking
def eval_reranking(model: Any, task: TaskConfig, path: Path, batch_size: int) -> dict[str, float]:
    rows = _rows(task, path, ("query", "document", "label"))
    groups: dict[str, list[tuple[str, int]]] = {}
    for r in rows:
        groups.setdefault(r[task.column("query")], []).append(
            (r[task.column("document")], int(r[task.column("label")]))
        )
    # MTEB skips queries whose candidates are all positive or all negative: AP is undefined
    usable = {q: c for q, c in groups.items() if 0 < sum(lab > 0 for _, lab in c) < len(c)}
    if not usable:
        raise DataError(f"{path}: no query has both positive and negative candidates")
    queries = list(usable)
    docs = sorted({d for c in usable.values() for d, _ in c})
    q_emb = l2_normalise(_encode(model, queries, _query_prompt(model, task), batch_size))
    d_emb = l2_normalise(_encode(model, docs, _document_prompt(model, task), batch_size))
    doc_index = {d: i for i, d in enumerate(docs)}
    aps, rrs = [], []
    for qi, q in enumerate(queries):
        cands = usable[q]
        sims = d_emb[[doc_index[d] for d, _ in cands]] @ q_emb[qi]
        labels = np.array([lab > 0 for _, lab in cands], dtype=int)
        aps.append(metrics.average_precision(labels, sims))
        ranked = labels[np.argsort(-sims, kind="stable")][:10]
        rrs.append(1.0 / (int(np.argmax(ranked)) + 1) if ranked.any() else 0.0)
    return {
        "map": float(np.mean(aps)),
        "mrr_at_10": float(np.mean(rrs)),
        "num_queries": len(queries),
        "num_skipped_queries": len(groups) - len(queries),
    }


# ---------------------------------------------------------------------------- dispatch
def evaluate_task(model: Any, task: TaskConfig, data_root: Path, batch_size: int = 32) -> dict:
    """Run one task and return an MTEB-like result object.

    Returns:
        ``{"task_name", "task_type", "evaluation_time", "scores": {split: [{"hf_subset",
        "main_score", <metrics>}]}}`` with scores as fractions.
    """
    path = data_root / task.path
    if task.type != "retrieval":
        require_file(path, f"data file of task {task.name!r}")
    start = time.perf_counter()
    if task.type == "retrieval":
        scores = eval_retrieval(model, task, path, batch_size)
    elif task.type == "sts":
        scores = eval_sts(model, task, path, batch_size)
    elif task.type == "classification":
        train_path = require_file(data_root / task.train_path, f"training file of task {task.name!r}")
        scores = eval_classification(model, task, path, train_path, batch_size)
    elif task.type == "pair_classification":
        scores = eval_pair_classification(model, task, path, batch_size)
    elif task.type == "clustering":
        scores = eval_clustering(model, task, path, batch_size)
    else:
        scores = eval_reranking(model, task, path, batch_size)
    entry = {"hf_subset": task.subset, "main_score": scores[MAIN_SCORE[task.type]], **scores}
    return {
        "task_name": task.name,
        "task_type": task.type,
        "dataset_path": str(path),
        "evaluation_time": round(time.perf_counter() - start, 3),
        "main_score_name": MAIN_SCORE[task.type],
        "scores": {task.split: [entry]},
    }
