"""``embforge mine``, ``filter`` and ``synth``: training data made, cleaned and mined (also under torchrun)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from embforge.cli.common import (
    Subparsers,
    add_model_args,
    add_on_bad_record,
    add_shard_args,
    model_overrides,
    shard_paths,
)
from embforge.errors import ConfigError


def add_mine(sub: Subparsers) -> None:
    p = sub.add_parser("mine", help="mine hard negatives with a teacher model (positive-aware)")
    add_model_args(p)  # its --batch-size is MiningConfig.batch_size
    p.add_argument("--input", required=True, help="JSONL with query and positive (or positives); a glob for shards")
    p.add_argument(
        "--output", required=True, help="JSONL with negatives, negative_scores, positive_score (a folder for shards)"
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="candidate texts (.txt, .jsonl or BEIR corpus.jsonl); default: the input's positives",
    )
    # MiningConfig: one flag per field, named as the field (mining_config reads them by name;
    # tests/unit/test_cli_flags.py checks none is missing)
    p.add_argument("--num-negatives", type=int, default=7)
    p.add_argument("--range-min", type=int, default=0, help="skip candidates ranked <= this")
    p.add_argument("--range-max", type=int, default=50, help="look no deeper than this rank")
    p.add_argument(
        "--max-score-ratio", type=float, default=0.95, help="drop scores above ratio x positive score (0: off)"
    )
    p.add_argument("--margin", type=float, default=None, help="drop scores above positive score - margin")
    p.add_argument("--sampling", choices=["top", "random"], default="top")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat", help="flat = exact search")
    p.add_argument("--chunk-size", type=int, default=4096, help="queries searched at once")
    p.add_argument("--query-prompt-name", default=None)
    p.add_argument("--document-prompt-name", default=None)
    p.add_argument("--cache-dir", default=None, help="re-use corpus embeddings across runs")
    p.add_argument("--keep-incomplete", action="store_true", help="write records with fewer negatives than asked")
    add_on_bad_record(p, "error")
    p.set_defaults(func=cmd_mine)


def mining_config(args: argparse.Namespace):
    """The MiningConfig of ``embforge mine``: each field from the flag of its name (``--max-score-ratio 0``: off)."""
    from embforge.data.mining import MiningConfig

    values = {f.name: getattr(args, f.name) for f in fields(MiningConfig)}
    if values["max_score_ratio"] <= 0:
        values["max_score_ratio"] = None
    return MiningConfig(**values)


def cmd_mine(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from embforge.data.mining import mine_shards, read_corpus
    from embforge.models.embedder import Embedder
    from embforge.train.parallel import distributed_session

    cfg = mining_config(args)
    inputs, outputs = shard_paths(args.input, args.output)
    corpus = read_corpus(Path(args.corpus)) if args.corpus else None
    with distributed_session() as info:  # under torchrun, each rank mines every world-th shard
        teacher = Embedder.load(args.model, device=args.device or info.device, **model_overrides(args))
        with tqdm(desc="mine", unit="query", disable=not info.is_main) as bar:
            summary = mine_shards(
                teacher,
                inputs,
                outputs,
                cfg,
                corpus=corpus,
                cache_dir=args.cache_dir,
                keep_incomplete=args.keep_incomplete,
                rank=info.rank,
                world=info.world,
                progress=bar.update,
            )
    if info.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def add_filter(sub: Subparsers) -> None:
    p = sub.add_parser("filter", help="consistency filtering (Nomic) or dedup/hygiene of training pairs")
    fsub = p.add_subparsers(dest="filter_kind", required=True)
    c = fsub.add_parser(
        "consistency",
        help="keep a pair only if its document is in the query's top-k (per shard and source, chunked, streamed)",
    )
    add_model_args(c)
    add_shard_args(c)
    c.add_argument("--top-k", type=int, default=2)
    c.add_argument("--chunk-pairs", type=int, default=1_000_000, help="pairs compared at once within a source")
    c.add_argument("--source-field", default="source")
    c.add_argument("--query-prompt-name", default=None)
    c.add_argument("--document-prompt-name", default=None)
    add_on_bad_record(c, "error")
    c.set_defaults(func=cmd_filter)
    c = fsub.add_parser(
        "clean",
        help="drop empty, too short/long, duplicate and near-duplicate pairs (duplicates are found within each shard)",
    )
    c.add_argument("model", nargs="?", default=None, help="teacher for --near-duplicates")
    add_shard_args(c)
    c.add_argument("--min-chars", type=int, default=1)
    c.add_argument("--max-chars", type=int, default=None)
    c.add_argument(
        "--near-duplicates", type=float, default=None, metavar="COSINE", help="also drop near duplicates (needs MODEL)"
    )
    c.add_argument("--chunk-pairs", type=int, default=4096, help="pairs embedded at once for --near-duplicates")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-seq-len", type=int, default=None)
    c.add_argument("--device", default=None)
    add_on_bad_record(c, "skip")
    c.set_defaults(func=cmd_filter)


def cmd_filter(args: argparse.Namespace) -> int:
    from embforge.data.cleaning import clean_shards
    from embforge.data.filtering import consistency_filter_shards
    from embforge.train.parallel import distributed_session

    if args.filter_kind == "clean" and args.near_duplicates is not None and args.model is None:
        raise ConfigError("filter clean --near-duplicates needs a teacher MODEL argument")
    inputs, outputs = shard_paths(args.input, args.output)
    with distributed_session() as info:  # under torchrun, each rank writes every world-th shard
        teacher = None
        if args.filter_kind == "consistency" or args.near_duplicates is not None:
            from embforge.models.embedder import Embedder

            teacher = Embedder.load(args.model, device=args.device or info.device, **model_overrides(args))
        common = {
            "chunk_pairs": args.chunk_pairs,
            "batch_size": args.batch_size,
            "on_bad_record": args.on_bad_record,
            "rank": info.rank,
            "world": info.world,
        }
        if args.filter_kind == "consistency":
            prompts = {"query_prompt_name": args.query_prompt_name, "document_prompt_name": args.document_prompt_name}
            summary = consistency_filter_shards(
                teacher, inputs, outputs, top_k=args.top_k, source_field=args.source_field, **prompts, **common
            )
        else:
            limits = {"min_chars": args.min_chars, "max_chars": args.max_chars}
            counts = clean_shards(
                inputs, outputs, teacher=teacher, near_duplicate_threshold=args.near_duplicates, **limits, **common
            )
            summary = {"shards": len(inputs), **counts}
    if info.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def add_synth(sub: Subparsers) -> None:
    p = sub.add_parser("synth", help="generate synthetic retrieval examples with an OpenAI-compatible chat endpoint")
    p.add_argument("config", help="YAML: endpoint, model, output, num_tasks, examples_per_task, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from embforge.config import load_config
    from embforge.data.synthetic import SynthConfig, generate

    cfg = load_config(SynthConfig, args.config, args.set)
    with tqdm(total=cfg.num_tasks * cfg.examples_per_task, desc="synth", unit="example") as bar:
        stats = generate(cfg, progress=bar.update)
    print(json.dumps(dict(stats), indent=2))
    return 0
