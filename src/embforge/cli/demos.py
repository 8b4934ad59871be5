"""``embforge quickstart`` and ``nomic-cpu``: the demo pipelines of embforge.apps, one command each."""

from __future__ import annotations

import argparse
from pathlib import Path

from embforge.cli.common import Subparsers


def add_nomic_cpu(sub: Subparsers) -> None:
    p = sub.add_parser(
        "nomic-cpu",
        help="Nomic Embed at CPU size: MLM -> consistency-filtered contrastive -> fine-tune on the shared datasets, "
        "scored",
    )
    p.add_argument("--output-dir", default="runs/nomic_cpu")
    p.add_argument(
        "--data-root",
        default=None,
        help="the shared datasets folder (default: $EMBFORGE_DATA, else ../shared/data)",
    )
    p.add_argument("--tasks", default="tasks/shared_mteb.yaml", help="task file naming MLQuestions and DBPedia-Subset")
    p.set_defaults(func=cmd_nomic_cpu)


def cmd_nomic_cpu(args: argparse.Namespace) -> int:
    from embforge.apps.nomic_cpu import data_root, run_nomic_cpu

    run_nomic_cpu(Path(args.output_dir), data_root(args.data_root), Path(args.tasks))
    return 0


def add_quickstart(sub: Subparsers) -> None:
    p = sub.add_parser(
        "quickstart", help="the main job: fine-tune MiniLM for code search on the local stdlib, before/after table"
    )
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument(
        "--steps", type=int, help="training steps of each of the two stages (default: the recipe's 80 and 50)"
    )
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from embforge.apps.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), model_name=args.model, steps=args.steps)
    return 0
