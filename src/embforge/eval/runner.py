"""Run a task file against a model; write MTEB-like JSON and print a table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embforge.config import apply_overrides, from_dict, read_yaml
from embforge.errors import ConfigError
from embforge.eval.task_config import InstructionTable, TaskSuite
from embforge.eval.tasks import evaluate_task


def load_suite(
    path: str | Path, overrides: list[str] = (), data_root: str | Path | None = None
) -> tuple[TaskSuite, Path]:
    """Read a task file strictly; return it and its resolved data root.

    The data root is, by priority: ``data_root`` (e.g. ``--data-root``), the
    ``EMBFORGE_DATA`` environment variable, then the file's ``data_root`` key resolved
    relative to the file's folder.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        suite = from_dict(TaskSuite, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if suite.instructions:
        table_file = path.parent / suite.instructions
        try:
            table = from_dict(InstructionTable, read_yaml(table_file))
        except ConfigError as exc:
            raise ConfigError(f"{table_file}: {exc}") from exc
        for task in suite.tasks:
            task.instruction = task.instruction or table.lookup(task)
    root = data_root or os.environ.get("EMBFORGE_DATA")
    resolved = Path(root) if root else (path.parent / suite.data_root)
    return suite, resolved.resolve()


def run_suite(
    model: Any, suite: TaskSuite, data_root: Path, *, batch_size: int = 32, only: list[str] | None = None
) -> dict:
    """Evaluate ``model`` on every task (or the ``only`` ones) -> results document."""
    tasks = suite.tasks
    if only:
        names = [t.name for t in tasks]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"unknown task name(s) {unknown}; the task file has {names}")
        tasks = [t for t in tasks if t.name in only]
    results = [evaluate_task(model, task, data_root, batch_size=batch_size) for task in tasks]
    return {"model": str(getattr(model, "name_or_path", type(model).__name__)), "results": results}


def main_scores(report: dict) -> dict[str, float]:
    """Task name -> main score ×100."""
    out = {}
    for r in report["results"]:
        (entries,) = r["scores"].values()
        out[r["task_name"]] = 100.0 * entries[0]["main_score"]
    return out


def print_table(report: dict, title: str = "embforge eval") -> None:
    """Print task, type, split, metric and main score ×100 as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "type", "split", "metric", "score ×100", "seconds"):
        table.add_column(col, justify="right" if col in ("score ×100", "seconds") else "left")
    for r in report["results"]:
        ((split, entries),) = r["scores"].items()
        table.add_row(
            r["task_name"],
            r["task_type"],
            split,
            r["main_score_name"],
            f"{100 * entries[0]['main_score']:.2f}",
            f"{r['evaluation_time']:.1f}",
        )
    Console().print(table)
