"""``embforge`` command line: one module per command group, each command's flags beside its handler.

Heavy imports (torch, transformers) happen inside handlers: ``embforge --help`` imports none.
"""

from __future__ import annotations

import argparse
import sys

from embforge.cli import adapt, data, demos, export, inference, serve, training
from embforge.cli.serve import _adapter_modules, _serving_calibration, _serving_instructions
from embforge.cli.training import MERGE_METHODS
from embforge.errors import EmbforgeError

__all__ = [
    "MERGE_METHODS",
    "_adapter_modules",
    "_serving_calibration",
    "_serving_instructions",
    "build_parser",
    "main",
]

# the commands, in the order `embforge --help` lists them
COMMANDS = (
    inference.add_encode,
    serve.add_serve,
    inference.add_calibrate,
    export.add_export,
    inference.add_eval,
    data.add_mine,
    data.add_filter,
    data.add_synth,
    training.add_train,
    adapt.add_adapt,
    training.add_distill,
    training.add_merge,
    training.add_plan,
    demos.add_nomic_cpu,
    demos.add_quickstart,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embforge", description="Train, evaluate and serve text-embedding models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmbforgeError as exc:
        print(f"embforge: error: {exc}", file=sys.stderr)
        return 2
