"""``embforge encode``, ``calibrate`` and ``eval``: a trained model (or an ONNX folder) at work."""

from __future__ import annotations

import argparse
from pathlib import Path

from embforge.cli.common import Subparsers, add_model_args, load_inference_model, load_model
from embforge.errors import ConfigError


def add_encode(sub: Subparsers) -> None:
    p = sub.add_parser("encode", help="embed texts from a .txt or .jsonl file into a .npy file")
    add_model_args(p)
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl")
    p.add_argument("--output", required=True, help="output .npy file (written atomically)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--prompt-name", default=None, help="name of a model prompt to prepend (e.g. query)")
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka truncation")
    p.add_argument("--int8", action="store_true", help="ONNX folder: run the int8-quantised model")
    p.add_argument(
        "--runtime",
        choices=["onnxruntime", "openvino"],
        default=None,
        help="ONNX folder: the runtime that runs it (default: onnxruntime)",
    )
    p.set_defaults(func=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    from embforge.data.io import read_texts, save_npy

    texts = read_texts(args.input, field=args.field)
    model = load_inference_model(args)
    emb = model.encode(
        texts, batch_size=args.batch_size, prompt_name=args.prompt_name, dimensions=args.dimensions, show_progress=True
    )
    save_npy(args.output, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}")
    return 0


def add_calibrate(sub: Subparsers) -> None:
    p = sub.add_parser("calibrate", help="int8/uint8 output ranges from a sample of your corpus (for serve)")
    add_model_args(p)
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl sample of your corpus")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--sample", type=int, default=5000, help="texts drawn (with --seed) from the input at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dimensions", default=None, help="comma-separated widths to calibrate (default: the full one)")
    p.add_argument("--prompt-name", default=None, help="the prompt documents are embedded with (e.g. document)")
    p.add_argument("--int8", action="store_true", help="ONNX folder: embed with the int8-quantised model")
    p.add_argument("--output", default=None, help="the file to write (default: MODEL/calibration.json)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import random

    from embforge.data.io import read_texts
    from embforge.quantization import calibrate

    if args.output is None and not Path(args.model).is_dir():
        raise ConfigError(f"{args.model} is not a model folder: give --output FILE for its calibration")
    texts = read_texts(args.input, field=args.field)
    if len(texts) > args.sample:
        texts = random.Random(args.seed).sample(texts, args.sample)
    model = load_inference_model(args)
    full = model.encode(texts, batch_size=args.batch_size, prompt_name=args.prompt_name, show_progress=True)
    widths = [int(d) for d in args.dimensions.split(",")] if args.dimensions else []
    calibration = calibrate(full, widths, bool(model.head.normalize), args.prompt_name)
    out = calibration.save(args.output or args.model)
    print(f"wrote int8/uint8 ranges for {sorted(calibration.ranges)} dimensions from {len(texts)} texts to {out}")
    return 0


def add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="MTEB-style evaluation on local files")
    add_model_args(p)
    p.add_argument("--tasks", required=True, help="task file (YAML)")
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--only", nargs="+", default=None, help="run only these task names")
    p.add_argument("--data-root", default=None, help="override the task file's data_root")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a task-file key")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from embforge.data.io import save_json
    from embforge.eval.runner import load_suite, print_table, run_suite

    suite, data_root = load_suite(args.tasks, args.set, data_root=args.data_root)
    model = load_model(args)
    report = run_suite(model, suite, data_root, batch_size=args.batch_size, only=args.only)
    report["model"] = args.model
    print_table(report, title=f"{args.model} on {args.tasks}")
    if args.output:
        save_json(args.output, report)
        print(f"results written to {args.output}")
    return 0
