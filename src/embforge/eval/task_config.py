"""The task-file schema: MTEB-style tasks on local files, their columns and main scores, and
instruction tables (plain dataclasses read strictly by :func:`embforge.config.from_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embforge.config import did_you_mean
from embforge.errors import ConfigError

TaskType = Literal["retrieval", "sts", "classification", "pair_classification", "clustering", "reranking"]

# role -> default column name, per task type (override with `fields:`)
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "retrieval": {},
    "sts": {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"},
    "classification": {"text": "text", "label": "label"},
    "pair_classification": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    "clustering": {"text": "text", "label": "label"},
    "reranking": {"query": "query", "document": "document", "label": "label"},
}
MAIN_SCORE = {
    "retrieval": "ndcg_at_10",
    "sts": "cosine_spearman",
    "classification": "accuracy",
    "pair_classification": "max_ap",
    "clustering": "v_measure",
    "reranking": "map",
}


@dataclass
class TaskConfig:
    """One evaluation task read from local files."""

    name: str
    type: TaskType
    path: str  # BEIR folder (retrieval) or JSONL file, relative to the suite's data_root
    split: str = "test"  # retrieval: qrels/<split>.tsv; otherwise a label in the results
    subset: str = "default"
    train_path: str | None = None  # classification: the training JSONL
    fields: dict[str, str] = field(default_factory=dict)
    prompt_name: str | None = None  # symmetric tasks
    query_prompt_name: str | None = None  # retrieval / reranking
    document_prompt_name: str | None = None
    # task instruction (NV-Embed): models with an instruction_template prepend it to queries (both
    # sides of symmetric tasks), attended to but not pooled; models without one ignore it
    instruction: str | None = None
    n_experiments: int = 10  # classification / clustering repetitions
    samples_per_label: int = 8  # classification undersampling (MTEB's default; many tasks set 16 or 32)
    seed: int = 42
    k_values: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 100, 1000])

    def validate(self, path: str) -> None:
        allowed = DEFAULT_FIELDS[self.type]
        for role in self.fields:
            if role not in allowed:
                raise ConfigError(
                    f"{path}.fields: unknown role {role!r} for a {self.type} task"
                    + did_you_mean(role, allowed)
                    + f"; roles: {sorted(allowed)}"
                )
        if self.type == "classification" and self.train_path is None:
            raise ConfigError(f"{path}: a classification task needs train_path")
        if self.type != "classification" and self.train_path is not None:
            raise ConfigError(f"{path}.train_path: only classification tasks take a training file")
        if self.n_experiments < 1 or self.samples_per_label < 1:
            raise ConfigError(f"{path}: n_experiments and samples_per_label must be >= 1")

    def column(self, role: str) -> str:
        return self.fields.get(role, DEFAULT_FIELDS[self.type][role])


@dataclass
class InstructionTable:
    """Task instructions (NV-Embed): by task name, else by task type."""

    by_type: dict[TaskType, str] = field(default_factory=dict)
    by_task: dict[str, str] = field(default_factory=dict)

    def lookup(self, task: TaskConfig) -> str | None:
        return self.by_task.get(task.name, self.by_type.get(task.type))


@dataclass
class TaskSuite:
    """A task file: where the data lives and which tasks to run."""

    tasks: list[TaskConfig]
    data_root: str = "."
    instructions: str | None = None  # an InstructionTable YAML (relative to this file) for tasks without one

    def validate(self, path: str) -> None:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path or 'tasks'}: duplicate task names {dupes}")
