"""A contrastive stage's batches: its datasets read into sources, a sampler over them, and the
prompted, tokenised, laid-out batch (:class:`ContrastiveBatch`) its step trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from embforge.data.examples import classification_records, read_sts, sts_records
from embforge.data.pairs import (
    BatchSampler,
    Example,
    MemorySource,
    StreamSource,
    load_beir_pairs,
    load_jsonl_records,
    text_key,
)
from embforge.data.records import DataReport
from embforge.errors import DataError
from embforge.train.distill import Teacher, TeacherBatch
from embforge.train.recipe import DEFAULT_SHUFFLE_BUFFER, DataConfig, DatasetConfig


def build_sampler(
    data: DataConfig,
    data_root: Path,
    seed: int,
    world: int,
    *,
    in_batch_negatives: bool = True,
    rank: int = 0,
    mine_sts=None,
) -> tuple[BatchSampler, DataReport]:
    """Sources for every dataset of the stage, combined by the configured sampler.

    ``mine_sts``: ``(dataset config, StsPairs, report, num_negatives) -> records`` for STS datasets
    with ``negatives: mined`` (:class:`~embforge.train.sts_mining.StsMiner`); such a dataset without it is an error.

    ``rank_reading: global``: the sampler draws global batches (``batch_size · world``), the
    same on every rank. ``own_share`` (world > 1): rank ``rank`` reads only its share of each
    dataset (JSONL files and streams: every ``world``-th line, the others left unparsed; task
    files, which are small, are read whole and their examples dealt out alike) and draws
    batches of ``batch_size``; the dataset choices use the common ``seed``, so every rank
    picks the same datasets for a batch.

    ``no_duplicates`` only matters where a query is scored against other examples' documents: it
    applies to the datasets whose in-batch negatives are on (with the stage's on); the others may
    repeat a text (e.g. the two label texts of a binary classification set), since their queries
    see only their own documents, and where one of their documents equals another query's
    positive the loss masks it (``doc_keys``).
    """
    report = DataReport()
    sources = []
    share = (rank, world) if data.reads_own_share(world) else None
    # task files are read whole on every rank: only rank 0 counts them, so the summed counts are the file's
    whole_file_report = DataReport() if share is not None and rank > 0 else report

    def memory(records, i, shared=False):  # shared: ``records`` is already this rank's share
        if share is not None and not shared:
            records = records[rank::world]
        ds = data.datasets[i]
        return MemorySource(records, seed + i, ds.name, data.negatives_of(ds), data.negative_sampling)

    for i, ds in enumerate(data.datasets):
        path = data_root / ds.path
        fields = ds.fields or {}
        num_negatives = data.negatives_of(ds)
        if ds.format == "beir":
            if num_negatives:
                raise DataError(f"dataset {ds.name!r}: BEIR pairs carry no hard negatives; mine them first")
            sources.append(memory(load_beir_pairs(path, ds.split, ds.name, whole_file_report), i))
        elif ds.format in ("classification", "clustering"):
            records = classification_records(
                path,
                ds.name,
                num_negatives=num_negatives,
                seed=seed + i,
                report=whole_file_report,
                text_field=fields.get("text", "text"),
                label_field=fields.get("label", "label"),
                label_texts=ds.label_texts,
            )
            sources.append(memory(records, i))
        elif ds.format == "sts" and ds.negatives == "mined":
            if mine_sts is None:
                raise DataError(f"dataset {ds.name!r}: negatives: mined needs a teacher (train_stage gives one)")
            keys = tuple(fields.get(k, k) for k in ("sentence1", "sentence2", "score"))
            sts = read_sts(path, ds.name, report=whole_file_report, min_score=ds.min_score, fields=keys)
            sources.append(memory(mine_sts(ds, sts, whole_file_report, num_negatives), i))
        elif ds.format == "sts":
            keys = tuple(fields.get(k, k) for k in ("sentence1", "sentence2", "score"))
            records = sts_records(
                path,
                ds.name,
                num_negatives=num_negatives,
                seed=seed + i,
                report=whole_file_report,
                min_score=ds.min_score,
                fields=keys,
            )
            sources.append(memory(records, i))
        elif ds.stream:
            if fields:
                raise DataError(f"dataset {ds.name!r}: fields renaming applies to in-memory JSONL, not streamed shards")
            sources.append(
                StreamSource(
                    str(path),
                    ds.name,
                    num_negatives,
                    report,
                    seed + i,
                    data.on_bad_record,
                    shuffle_buffer=DEFAULT_SHUFFLE_BUFFER if ds.shuffle_buffer is None else ds.shuffle_buffer,
                    negative_sampling=data.negative_sampling,
                    share=share or (0, 1),
                )
            )
        else:
            if not path.is_file():
                raise DataError(f"dataset {ds.name!r}: file not found: {path}")
            records = load_jsonl_records(path, ds.name, num_negatives, report, fields, data.on_bad_record, share)
            sources.append(memory(records, i, shared=True))
    sampler = BatchSampler(
        sources,
        [d.weight for d in data.datasets],
        data.batch_size * (1 if share else world),
        data.sampler,
        [data.no_duplicates and in_batch_negatives and d.in_batch_negatives for d in data.datasets],
        seed,
    )
    return sampler, report


@dataclass
class ContrastiveBatch:
    queries: dict[str, torch.Tensor]  # tokenised (B, Tq)
    # tokenised (B + ΣN_i, Td): positives (this epoch's), then each query's negatives in turn
    # (row-major (B·(1+N), Td) when every query has N)
    docs: dict[str, torch.Tensor]
    query_keys: torch.Tensor  # (B,) text ids
    doc_keys: torch.Tensor  # (B + ΣN_i,) text ids
    in_batch: torch.Tensor  # (B,) per-query in-batch-negatives flag
    num_negatives: int  # N: every query's negatives, or the stage's most when its datasets differ
    # (B,) each query's negatives where the stage's datasets differ in num_negatives (the same on every
    # rank: it decides whether the loss pads, see embforge.losses); None: every query has N
    negative_counts: torch.Tensor | None = None
    teacher: TeacherBatch | None = None  # the teacher's embeddings of the same texts (loss.distill)


def _prompt(ds: DatasetConfig, instruction: str | None, instruction_prompt) -> str:
    if instruction is None:
        return ds.query_prompt
    prompt = instruction_prompt(instruction) if instruction_prompt is not None else None
    if prompt is None:
        raise DataError(
            f"dataset {ds.name!r} has an instruction ({instruction!r:.60}), but the model has no "
            "instruction_template; set model.instruction_template or use query_prompt"
        )
    return prompt


def query_prompt(example: Example, data: DataConfig, instruction_prompt=None) -> str:
    """The example's query prompt: its record's instruction, else its dataset's, through the model's
    template (``instruction_prompt``, i.e. the model head's :meth:`HeadSpec.instruction_prompt`); else the dataset's
    ``query_prompt``."""
    ds = data.datasets[example.dataset]
    instruction = example.record.instruction if example.record.instruction is not None else ds.instruction
    return _prompt(ds, instruction, instruction_prompt)


def document_prompt(example: Example, data: DataConfig, instruction_prompt=None) -> str:
    """The prompt of the example's positive and negatives: its query's with ``instruction_on_documents``
    (symmetric tasks: the same templated instruction on both sides), else the dataset's ``document_prompt``."""
    ds = data.datasets[example.dataset]
    return query_prompt(example, data, instruction_prompt) if ds.instruction_on_documents else ds.document_prompt


def collate(
    examples: list[Example],
    data: DataConfig,
    tokenize,
    device: torch.device,
    instruction_prompt=None,
    teacher: Teacher | None = None,
) -> ContrastiveBatch:
    """Prompt, tokenise and lay out a batch (see :mod:`embforge.losses` for the layout).

    Args:
        tokenize: ``(texts, prompts) -> features``, i.e. :meth:`Embedder.tokenize` with one prompt per text.
        instruction_prompt: ``instruction -> query prompt`` (see :func:`query_prompt`).
        teacher: embeds the same texts with the teacher's own prompts (``loss.distill``).
    """
    cfgs = [data.datasets[e.dataset] for e in examples]
    queries = [e.record.query for e in examples]
    q_prompts = [query_prompt(e, data, instruction_prompt) for e in examples]
    docs = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
    d_prompts = [document_prompt(e, data, instruction_prompt) for e in examples]
    doc_prompts = d_prompts + [p for p, e in zip(d_prompts, examples) for _ in e.negatives]
    counts = [len(e.negatives) for e in examples]
    return ContrastiveBatch(
        queries={k: v.to(device) for k, v in tokenize(queries, q_prompts).items()},
        docs={k: v.to(device) for k, v in tokenize(docs, doc_prompts).items()},
        query_keys=torch.tensor([text_key(q) for q in queries], device=device),
        doc_keys=torch.tensor([text_key(t) for t in docs], device=device),
        in_batch=torch.tensor([c.in_batch_negatives for c in cfgs], device=device),
        num_negatives=data.max_negatives,
        negative_counts=torch.tensor(counts, device=device) if data.mixed_negatives else None,
        teacher=teacher.embed_batch(queries, docs, device) if teacher is not None else None,
    )
