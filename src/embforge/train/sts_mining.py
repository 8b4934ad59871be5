"""Mined negatives for STS datasets (``negatives: mined``), mined once when a stage builds its data.

NV-Embed-v2 (arXiv 2405.17428 v2 §4.1) mines hard negatives positive-aware: candidates scoring
above ``max_score_ratio`` x the positive's score under a teacher are dropped, the top-k of the
rest kept. :class:`StsMiner` is what :func:`embforge.train.batches.build_sampler` calls for such
datasets (the mining itself: :func:`embforge.data.examples.mined_sts_records`).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from embforge.atomic import atomic_write
from embforge.data.examples import StsPairs, mined_sts_records
from embforge.data.pairs import text_key
from embforge.data.records import DataReport, TrainingRecord
from embforge.errors import DataError
from embforge.train.parallel import DistInfo, patient_group
from embforge.train.recipe import DatasetConfig


class StsMiner:
    """:func:`build_sampler`'s ``mine_sts``: negatives of ``negatives: mined`` STS datasets, mined once
    when the stage builds its data (:func:`~embforge.data.examples.mined_sts_records`).

    The teacher is the dataset's ``mining_model`` (loaded on this rank's device, then dropped) or
    ``embedder``, the stage's starting model (an FSDP run's host copy is moved to the device for it
    and back). Each side is embedded with the prompts it trains with, the instruction through the
    teacher's template. Rank 0 mines and broadcasts the records (the others wait on a gloo group
    with the patience of evaluation, ``eval_timeout_s``). The records are saved in ``folder``
    under a digest of what they depend on (the file's pairs and sentences, N, ratio, teacher name,
    prompt settings) and re-used only when the stage resumes from a checkpoint, which started from the
    same weights: a fresh start mines again.
    """

    def __init__(self, embedder, info: DistInfo, folder: Path, *, resuming: bool, timeout_s: float):
        self.embedder, self.info, self.folder, self.resuming = embedder, info, folder, resuming
        self.timeout_s, self.group = timeout_s, None

    def __call__(self, ds: DatasetConfig, sts: StsPairs, report: DataReport, num_negatives: int) -> list:
        rows = None
        if self.info.is_main:
            rows = self._rows(ds, sts, report, num_negatives)
        if self.info.world > 1:
            if self.group is None:
                self.group = patient_group(self.timeout_s)
            box = [rows]
            dist.broadcast_object_list(box, src=0, group=self.group)
            rows = box[0]
        return [TrainingRecord(q, [p], negs, ds.name) for q, p, negs in rows]

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def _rows(self, ds: DatasetConfig, sts: StsPairs, report: DataReport, num_negatives: int) -> list:
        from embforge.models.embedder import Embedder

        prompting = [ds.instruction, ds.query_prompt, ds.document_prompt, ds.instruction_on_documents]
        settings = [sts.pairs, sts.pool, num_negatives, ds.max_score_ratio, ds.mining_model, prompting]
        path = self.folder / f"{ds.name}-{text_key(json.dumps(settings)):016x}.json"
        reason = f"fewer than {num_negatives} mined negatives"  # as mined_sts_records counts it
        if self.resuming and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["skipped"]:
                report.skipped.setdefault(ds.name, Counter())[reason] += saved["skipped"]
            return saved["rows"]
        owned = ds.mining_model is not None
        teacher = Embedder.load(ds.mining_model, device=self.info.device) if owned else self.embedder
        prompts = _mining_prompts(ds, teacher.head.instruction_prompt)
        before = report.skipped.get(ds.name, Counter())[reason]
        with _on_device(teacher, self.info.device):
            records = mined_sts_records(
                sts,
                ds.name,
                teacher,
                num_negatives=num_negatives,
                report=report,
                max_score_ratio=ds.max_score_ratio,
                query_prompt=prompts[0],
                document_prompt=prompts[1],
            )
        if owned:
            del teacher
        if sts.pairs and not records:
            raise DataError(
                f"dataset {ds.name!r}: no sentence kept {num_negatives} mined negatives below {ds.max_score_ratio} x "
                "its positive's score; does the teacher score every sentence alike (e.g. texts truncated away by a "
                "long prompt at model.max_seq_len)?"
            )
        rows = [[r.query, r.positive, r.negatives] for r in records]
        skipped = report.skipped.get(ds.name, Counter())[reason] - before
        payload = json.dumps({"rows": rows, "skipped": skipped}, ensure_ascii=False)
        atomic_write(path, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
        return rows


def _mining_prompts(ds: DatasetConfig, instruction_prompt) -> tuple[str | None, str | None]:
    """(query, document) prompts of ``ds`` for the teacher: as in training, the instruction through
    ``instruction_prompt``; a teacher without a template (None) gets its default prompt."""
    query = ds.query_prompt if ds.instruction is None else instruction_prompt(ds.instruction)
    return query, query if ds.instruction_on_documents else ds.document_prompt


@contextlib.contextmanager
def _on_device(model: torch.nn.Module, device: torch.device):
    """``model`` on ``device`` inside the block, back where it was after it."""
    home = next(model.parameters()).device
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
