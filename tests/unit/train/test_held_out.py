"""The NV-Embed CPU twin's held-out tasks share no data with its training files.

STS Benchmark is built from the SemEval STS 2012-2016 sets (its train split holds 597 of
STS13's 1,428 pairs), and MRPC is STS12's MSRpar: a recipe that trains on them cannot
report those STS sets as unseen. This reads every training file of the recipe and every
held-out task of ``bench/nv_embed_cpu.py`` from ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

from embforge.eval.runner import load_suite
from embforge.train.recipe import load_recipe


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _strings(row) -> list[str]:
    if isinstance(row, str):
        return [row]
    if isinstance(row, dict):
        return [s for v in row.values() for s in _strings(v)]
    if isinstance(row, list):
        return [s for v in row for s in _strings(v)]
    return []


def _training_texts(recipe_path: Path, data_root: Path) -> set[str]:
    recipe, _ = load_recipe(recipe_path, [f"data_root={data_root}"])
    texts = set()
    for stage in recipe.stages:
        for ds in stage.data.datasets:
            files = (
                sorted(data_root.glob(ds.path))
                if ds.format != "beir"
                else sorted((data_root / ds.path).glob("*.jsonl"))
            )
            assert files, f"{ds.name}: no file at {ds.path}"
            for f in files:
                with f.open(encoding="utf-8") as lines:
                    texts.update(_norm(s) for line in lines if line.strip() for s in _strings(json.loads(line)))
    return texts


def test_held_out_tasks_share_no_text_with_the_training_data(shared_data, load_bench):
    bench = load_bench("nv_embed_cpu")
    seen = _training_texts(bench.RECIPE, shared_data)
    suite, _ = load_suite(bench.TASKS, data_root=shared_data)
    tasks = {t.name: t for t in suite.tasks}
    assert set(bench.HELD_OUT) <= set(tasks)
    checked = 0
    for name in bench.HELD_OUT:
        task = tasks[name]
        if task.type == "sts":
            rows = [json.loads(x) for x in (shared_data / task.path).read_text(encoding="utf-8").splitlines() if x]
            a, b = task.column("sentence1"), task.column("sentence2")
            leaked = [r for r in rows if _norm(r[a]) in seen and _norm(r[b]) in seen]
            assert not leaked, f"{name}: {len(leaked)} of {len(rows)} pairs are in the training data, e.g. {leaked[0]}"
        else:  # retrieval: neither its queries nor its corpus were trained on
            folder = shared_data / task.path
            for part in ("queries.jsonl", "corpus.jsonl"):
                texts = [json.loads(x)["text"] for x in (folder / part).read_text(encoding="utf-8").splitlines() if x]
                leaked = [t for t in texts if _norm(t) in seen]
                assert not leaked, f"{name} {part}: {len(leaked)} texts are in the training data, e.g. {leaked[0]!r}"
        checked += 1
    assert checked == len(bench.HELD_OUT) >= 3
