"""Nomic Embed at CPU size, all three stages in one command (``embforge nomic-cpu``).

1. **Data** from the shared datasets folder (:func:`data_root`): weakly related pairs of four
   sources (WikiText-2 title-body, SNLI entailment, MRPC paraphrases, STS Benchmark pairs scored
   >= 4), each consistency-filtered within its source with the packaged all-MiniLM-L6-v2 (top-2,
   arXiv 2402.01613 §4.2); Natural Questions (question, passage) pairs with 7 hard negatives mined
   by the same teacher (§4.3).
2. **MLM** (``recipes/nomic_embed/cpu_twin_mlm.yaml``): a 4 x 128 nomic-bert from scratch;
   its metric is the held-back masked-token accuracy.
3. **Contrastive** (``cpu_twin_contrastive.yaml``) from stage 2's weights, then **fine-tune**
   (``cpu_twin_finetune.yaml``, Matryoshka, v1.5 inference rule) from stage 3's weights; their
   metric is nDCG@10 on MLQuestions (dev) and DBPedia-Subset, retrieval tasks of other sources
   than any training pair, measured on each stage's starting and final model.
4. The Matryoshka curve of the final model (nDCG@10 of float and binary Hamming search at
   each dimension) on MLQuestions, plotted.

Every step reuses its output when it exists (the data files, finished stages), so a rerun
after an interruption continues; ``summary.json`` holds every number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from embforge.atomic import atomic_write
from embforge.data.io import read_jsonl
from embforge.errors import DataError

DATA_ENV = "EMBFORGE_DATA"  # the shared datasets folder when --data-root is not given
DEFAULT_DATA_ROOT = "../shared/data"  # then this, relative to the working directory (the checkout's root)
TEACHER = "all-MiniLM-L6-v2"
EVAL_TASKS = ("MLQuestions", "DBPedia-Subset")  # in tasks/shared_mteb.yaml; no training pair comes from them
CURVE_TASK = "MLQuestions"
RECIPES = (
    "nomic_embed/cpu_twin_mlm.yaml",
    "nomic_embed/cpu_twin_contrastive.yaml",
    "nomic_embed/cpu_twin_finetune.yaml",
)


@dataclass(frozen=True)
class PairSource:
    """A (query, positive) source read from one shared file."""

    name: str
    path: str  # relative to the shared data root
    query: str
    positive: str
    keep: Callable[[dict], bool]


SOURCES = (
    PairSource(
        "snli_entailment", "snli/pairs_dev.jsonl", "premise", "hypothesis", lambda r: r["label"] == "entailment"
    ),
    PairSource("mrpc_paraphrase", "mrpc/train.jsonl", "sentence1", "sentence2", lambda r: r["label"] == 1),
    PairSource("stsb_similar", "stsbenchmark/train.jsonl", "sentence1", "sentence2", lambda r: float(r["score"]) >= 4),
)


def data_root(flag: str | None) -> Path:
    """The shared datasets folder: ``--data-root``, else ``$EMBFORGE_DATA``, else ``../shared/data``.

    Args:
        flag: the ``--data-root`` value (None: not given).

    Returns:
        The folder, as given (relative to the working directory where relative).

    Raises:
        DataError: the folder is missing, or is not the shared datasets folder (no ``wikitext2/``).
    """
    if flag:
        shared, source = Path(flag), "--data-root"
    elif os.environ.get(DATA_ENV):
        shared, source = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        shared, source = Path(DEFAULT_DATA_ROOT), "the default"
    fix = f"pass --data-root DIR or set {DATA_ENV}"
    if not shared.is_dir():
        raise DataError(f"{shared} ({source}): no such folder; {fix} to the shared datasets folder")
    if not (shared / "wikitext2").is_dir():
        raise DataError(f"{shared} ({source}): not the shared datasets folder (no wikitext2/); {fix}")
    return shared


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return atomic_write(path, write)


def raw_pairs(shared: Path) -> dict[str, list[dict]]:
    """Each contrastive source's (query, positive) pairs, before filtering."""
    from embforge.data.mlm import read_wikitext_sections

    out: dict[str, list[dict]] = {}
    wiki = [
        p for f in ("wiki.valid.tokens", "wiki.test.tokens") for p in read_wikitext_sections(shared / "wikitext2" / f)
    ]
    out["wikitext_title_body"] = [{"query": h, "positive": t} for h, t in wiki]
    for src in SOURCES:
        rows = read_jsonl(shared / src.path, fields=(src.query, src.positive))
        out[src.name] = [
            {"query": r[src.query].strip(), "positive": r[src.positive].strip()}
            for r in rows
            if src.keep(r) and r[src.query].strip() and r[src.positive].strip()
        ]
    return out


def prepare_data(shared: Path, data: Path, console: Console) -> dict[str, dict]:
    """Write ``filtered/<source>.jsonl`` and ``finetune/nq_mined.jsonl`` (kept when present)."""
    from embforge.data.filtering import consistency_filter
    from embforge.models.embedder import Embedder

    teacher = None
    report: dict[str, dict] = {}
    for name, rows in raw_pairs(shared).items():
        out = data / "filtered" / f"{name}.jsonl"
        if not out.is_file():
            teacher = teacher or Embedder.load(TEACHER, max_seq_len=128)
            raw = write_jsonl(data / "raw" / f"{name}.jsonl", rows)
            consistency_filter(teacher, raw, out, top_k=2, batch_size=64)
        kept = sum(1 for _ in out.open(encoding="utf-8"))
        report[name] = {"pairs": len(rows), "kept": kept}
        console.print(f"consistency filter {name}: kept {kept:,} of {len(rows):,} pairs")
    mined = data / "finetune" / "nq_mined.jsonl"
    if not mined.is_file():
        teacher = teacher or Embedder.load(TEACHER, max_seq_len=128)
        mine_nq(shared, mined, teacher, console)
    report["nq_mined"] = {"pairs": sum(1 for _ in mined.open(encoding="utf-8"))}
    return report


def mine_nq(shared: Path, mined: Path, teacher, console: Console, **options) -> Path:
    """Natural Questions (question, passage) pairs with 7 hard negatives mined by ``teacher`` among all
    the passages, none above 0.95 x the positive's score (§4.3); pairs left with fewer are dropped.
    ``options`` replace the mining settings (:func:`mine_hard_negatives`'s keywords)."""
    from embforge.data.mining import mine_hard_negatives

    nq = read_jsonl(shared / "nq_question_passage_pairs" / "pairs.jsonl", fields=("query", "positive"))
    settings = {"num_negatives": 7, "skip_top": 0, "search_depth": 50, "max_score_ratio": 0.95, **options}
    result = mine_hard_negatives(
        teacher,
        [r["query"] for r in nq],
        [[r["positive"]] for r in nq],
        sorted({r["positive"] for r in nq}),
        **settings,
    )
    rows = [
        {"query": r["query"], "positive": r["positive"], "negatives": negs}
        for r, negs in zip(nq, result.negatives)
        if len(negs) == settings["num_negatives"]
    ]
    write_jsonl(mined, rows)
    console.print(
        f"mined {settings['num_negatives']} hard negatives for {len(rows):,} of {len(nq):,} NQ pairs; dropped {dict(result.dropped)}"
    )
    return mined


def evaluate(model, tasks_file: Path, shared: Path) -> dict[str, float]:
    """nDCG@10 (x100) of ``model`` on :data:`EVAL_TASKS`."""
    from embforge.eval.runner import load_suite, main_scores, run_suite

    suite, root = load_suite(tasks_file, data_root=shared)
    return main_scores(run_suite(model, suite, root, batch_size=64, only=list(EVAL_TASKS)))


def run_nomic_cpu(out_dir: Path, shared: Path, tasks_file: Path) -> dict:
    """Run the whole CPU twin (see the module docstring); return the summary (also in ``summary.json``)."""
    from embforge.eval.runner import load_suite
    from embforge.eval.tasks import eval_retrieval_dims
    from embforge.models.embedder import Embedder
    from embforge.train.mlm import mlm_summary
    from embforge.train.plots import plot_matryoshka
    from embforge.train.recipe import load_recipe, recipe_path
    from embforge.train.stages import run_recipe, stage_dirs

    console = Console()
    out_dir = out_dir.resolve()
    data = out_dir / "data"
    summary: dict = {"data": prepare_data(shared, data, console)}

    mlm_recipe, _ = load_recipe(
        recipe_path(RECIPES[0]), [f"data_root={shared.resolve()}", f"output_dir={out_dir / 'mlm'}"]
    )
    run_recipe(mlm_recipe, shared.resolve(), device="cpu")
    start = out_dir / "mlm" / "final"
    history = read_jsonl(stage_dirs(mlm_recipe)[0] / "metrics.jsonl")
    summary["mlm"] = {**mlm_summary(history), "model": str(start)}
    stages = {}
    for key, recipe_name in zip(("contrastive", "finetune"), RECIPES[1:]):
        overrides = [f"data_root={data}", f"output_dir={out_dir / key}", f"model.name_or_path={start}"]
        recipe, _ = load_recipe(recipe_path(recipe_name), overrides)
        if key == "contrastive":  # sources are drawn in proportion to their filtered size
            names = [d.name for d in recipe.stages[0].data.datasets]
            overrides += [
                f"stages.0.data.datasets.{i}.weight={summary['data'][n]['kept']}" for i, n in enumerate(names)
            ]
            recipe, _ = load_recipe(recipe_path(recipe_name), overrides)
        before_model = Embedder.load(start, device="cpu", **_head(recipe))
        before = evaluate(before_model, tasks_file, shared)
        del before_model
        model = run_recipe(recipe, data)
        after = evaluate(model, tasks_file, shared)
        stages[key] = {"start": str(start), "before": before, "after": after, "model": f"{recipe.output_dir}/final"}
        console.print(f"{key}: {before} -> {after}")
        start = Path(recipe.output_dir) / "final"
    summary["stages"] = stages

    final = Embedder.load(start, device="cpu")
    suite, root = load_suite(tasks_file, data_root=shared)
    (task,) = [t for t in suite.tasks if t.name == CURVE_TASK]
    dims = [final.hidden_size // 2**i for i in range(4)]  # 128, 64, 32, 16
    curve = eval_retrieval_dims(final, task, root / task.path, dims, batch_size=64)
    summary["matryoshka"] = {"task": CURVE_TASK, "rule": final.head.matryoshka_rule, "ndcg_at_10": curve}
    summary["plot"] = str(plot_matryoshka(curve, out_dir / "matryoshka.png", title=f"{CURVE_TASK} (dev), nDCG@10"))
    atomic_write(out_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    _print_summary(summary, console)
    return summary


def _head(recipe) -> dict:
    """The recipe's model-block settings, so a stage's starting model is scored the way it will be trained."""
    from embforge.models.build import head_overrides

    return head_overrides(recipe.model)


def _print_summary(summary: dict, console: Console) -> None:
    mlm = summary["mlm"]
    console.print(
        f"stage 1 MLM: held-back masked-token accuracy {mlm['masked_acc_before']:.2f} -> {mlm['masked_acc_after']:.2f} %"
    )
    table = Table(title="stages 2-3: nDCG@10 on retrieval tasks outside the training data")
    table.add_column("stage")
    for task in EVAL_TASKS:
        table.add_column(f"{task} before", justify="right")
        table.add_column(f"{task} after", justify="right")
    for key, s in summary["stages"].items():
        table.add_row(key, *[f"{s[w][t]:.2f}" for t in EVAL_TASKS for w in ("before", "after")])
    console.print(table)
    curve = Table(
        title=f"Matryoshka curve, {summary['matryoshka']['task']} nDCG@10 (rule: {summary['matryoshka']['rule']})"
    )
    curve.add_column("dimensions", justify="right")
    curve.add_column("float", justify="right")
    curve.add_column("binary (Hamming)", justify="right")
    for dim, s in summary["matryoshka"]["ndcg_at_10"].items():
        curve.add_row(dim, f"{100 * s['float']:.2f}", f"{100 * s['binary']:.2f}")
    console.print(curve)
    console.print(f"plot: {summary['plot']}")
