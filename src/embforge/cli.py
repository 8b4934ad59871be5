"""``embforge`` command line. Heavy imports (torch, transformers) happen inside handlers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embforge.errors import EmbforgeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="known model name (e.g. all-MiniLM-L6-v2) or a model folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=None, help="override the model's max sequence length")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _load_model(args: argparse.Namespace):
    from embforge.models.embedder import Embedder

    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}
    return Embedder.load(args.model, device=args.device, **overrides)


def cmd_encode(args: argparse.Namespace) -> int:
    from embforge.data.io import read_texts, save_npy

    texts = read_texts(args.input, field=args.field)
    model = _load_model(args)
    emb = model.encode(
        texts, batch_size=args.batch_size, prompt_name=args.prompt_name, dimensions=args.dimensions, show_progress=True
    )
    save_npy(args.output, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from embforge.data.io import save_json
    from embforge.eval.runner import load_suite, print_table, run_suite

    suite, data_root = load_suite(args.tasks, args.set, data_root=args.data_root)
    model = _load_model(args)
    report = run_suite(model, suite, data_root, batch_size=args.batch_size, only=args.only)
    report["model"] = args.model
    print_table(report, title=f"{args.model} on {args.tasks}")
    if args.output:
        save_json(args.output, report)
        print(f"results written to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from embforge.train.recipe import load_recipe
    from embforge.train.stages import run_recipe

    recipe, data_root = load_recipe(args.recipe, args.set)
    run_recipe(recipe, data_root, resume=not args.no_resume)
    print(f"final model: {recipe.output_dir}/final")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from embforge.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), model_name=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embforge", description="Train, evaluate and serve text-embedding models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="embed texts from a .txt or .jsonl file into a .npy file")
    _add_model_args(p)
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl")
    p.add_argument("--output", required=True, help="output .npy file (written atomically)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--prompt-name", default=None, help="name of a model prompt to prepend (e.g. query)")
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka truncation")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("eval", help="MTEB-style evaluation on local files")
    _add_model_args(p)
    p.add_argument("--tasks", required=True, help="task file (YAML)")
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--only", nargs="+", default=None, help="run only these task names")
    p.add_argument("--data-root", default=None, help="override the task file's data_root")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a task-file key")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="run a multi-stage training recipe (also under torchrun)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "quickstart", help="the main job: fine-tune MiniLM for code search on the local stdlib, before/after table"
    )
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmbforgeError as exc:
        print(f"embforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
