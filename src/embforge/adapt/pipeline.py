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
from pathlib import Path

import numpy as np

from embforge.adapt.corpus import Pair, llm_queries, pseudo_queries, read_folder
from embforge.adapt.settings import MAX_RUNS, SEARCH_ENCODES, AdaptSettings, Work, say
from embforge.adapt.steps import (
    Corpus,
    batch_shares,
    consistency_filter,
    encode,
    held_scores,
    hold_back,
    interpolate,
    measure_step_s,
    search_weight,
    side_prompt,
    train_recipe,
)
from embforge.atomic import atomic_write
from embforge.errors import DataError


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
    say(f"corpus: {len(data.ids)} passages ({len(corpus.texts)} distinct), {len(data.labelled)} labelled pairs")
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
            q_emb = encode(base, [p.query for p in made], "query")
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
    say(f"pairs: {state['pairs']}")
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
    say(f"mined: {mined['rows']}")
    if not mined["files"]:
        raise DataError(
            f"no training pair kept a mined negative ({mined['dropped by the positive-aware filter']}); "
            "lower --num-negatives or raise --max-negative-ratio"
        )

    # 5: plan
    weights = batch_shares(mined["rows"], settings)
    if "plan" not in state:
        probe = train_recipe(settings, output, 10, mined["files"], weights, base.head.prompts)
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
    say(f"plan: {plan['runs']} run(s) of {plan['steps']} steps at {plan['step_s']:.2f} s (cap {plan['epoch_cap']})")

    # 6: train, one run per seed (each resumes from its checkpoints), averaged into the soup
    start = time.perf_counter()
    finals = []
    for run in range(plan["runs"]):
        recipe = train_recipe(settings, output, plan["steps"], mined["files"], weights, base.head.prompts, run)
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
            say(f"merge weight {w}: held-back nDCG@10 {scores['ndcg_at_10']:.2f}")
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
