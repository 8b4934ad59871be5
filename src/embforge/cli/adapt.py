"""``embforge adapt``: a model adapted to a user's corpus in one command (embforge.adapt.pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from embforge.cli.common import Subparsers


def add_adapt(sub: Subparsers) -> None:
    p = sub.add_parser("adapt", help="adapt a model to your corpus (BEIR folder): pairs, filter, mine, train, merge")
    # AdaptSettings (tests/unit/test_cli_flags.py checks each field has a flag or is listed as internal there)
    p.add_argument("model", help="the base model: a packaged name or a folder")
    p.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl [+ queries.jsonl and qrels/train.tsv]")
    p.add_argument("--output", required=True, help="run folder: OUTPUT/final, OUTPUT/report.{md,json,png}")
    p.add_argument("--minutes", type=float, default=30.0, help="the whole run's time budget (training fills it)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: what the budget allows)")
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="training runs (seeds) averaged into the result (default: as many as the budget holds, at most 4; 1 with --steps)",
    )
    p.add_argument("--teacher", default=None, help="a stronger embedder: mines negatives and adds distillation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-negatives", type=int, default=1, help="mined hard negatives per query")
    p.add_argument(
        "--max-negative-ratio",
        type=float,
        default=0.95,
        help="positive-aware mining: no negative scoring above this x the positive's score",
    )
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pseudo", action="store_true", help="with labelled pairs: train on pseudo-queries too (default: them alone)"
    )
    p.add_argument("--llm-endpoint", default=None, help="OpenAI-compatible base URL for LLM-written queries")
    p.add_argument("--llm-model", default=None)
    p.add_argument("--llm-queries", type=int, default=0, help="passages to ask the LLM a query for")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from embforge.adapt.pipeline import AdaptSettings, adapt

    settings = AdaptSettings(
        model=args.model,
        data=str(Path(args.data).resolve()),
        teacher=args.teacher,
        minutes=args.minutes,
        steps=args.steps,
        runs=args.runs,
        seed=args.seed,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        max_negative_ratio=args.max_negative_ratio,
        lr=args.lr,
        max_seq_len=args.max_seq_len,
        pseudo=args.pseudo,
        llm_endpoint=args.llm_endpoint,
        llm_model=args.llm_model,
        llm_queries=args.llm_queries,
    )
    report = adapt(settings, args.output)
    h = report["held_back"]
    print(
        f"held-back nDCG@10: base {h['base']['ndcg_at_10']:.2f} -> final {h['final']['ndcg_at_10']:.2f} "
        f"(merge weight {report['merge_weight']}); model: {Path(args.output) / 'final'}, report: "
        f"{Path(args.output) / 'report.md'}"
    )
    return 0
