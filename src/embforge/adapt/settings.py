"""``embforge adapt``'s settings and its work folder (what finished steps left, for a re-run)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from embforge.atomic import atomic_write
from embforge.errors import ConfigError

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


def say(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[adapt] {text}")
