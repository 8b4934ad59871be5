"""``embforge export onnx``: a model folder for ONNX Runtime (and OpenVINO), optionally int8."""

from __future__ import annotations

import argparse

from embforge.cli.common import Subparsers, load_model
from embforge.errors import ConfigError


def add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="export a model for fast inference")
    esub = p.add_subparsers(dest="export_kind", required=True)
    e = esub.add_parser("onnx", help="ONNX Runtime folder (the whole Embedder.forward), optionally + int8")
    e.add_argument("model", help="known model name or a model folder")
    e.add_argument("output", help="output folder")
    e.add_argument("--int8", action="store_true", help="also write model_int8.onnx (dynamic int8 quantisation)")
    e.add_argument(
        "--int8-ffn-down",
        action="store_true",
        help="also quantise the feed-forward down-projections (heavy-tailed inputs): faster, further from fp32",
    )
    e.add_argument(
        "--openvino",
        action="store_true",
        help="with --int8: also write openvino_int8.xml (OpenVINO static int8, NNCF; run it with --runtime openvino)",
    )
    e.add_argument(
        "--calibration-input",
        default=None,
        help="with --openvino: .txt or .jsonl sample of your corpus the int8 ranges come from "
        "(default: docstrings and code of Python's standard library)",
    )
    e.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    e.add_argument("--max-seq-len", type=int, default=None, help="override the model's max sequence length")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from embforge.onnx.export import export_onnx

    args.device = "cpu"
    for flag in ("int8_ffn_down", "openvino"):
        if getattr(args, flag) and not args.int8:
            raise ConfigError(f"--{flag.replace('_', '-')} shapes the int8 model: add --int8")
    if args.calibration_input and not args.openvino:
        raise ConfigError("--calibration-input calibrates the OpenVINO int8 model: add --openvino")
    texts = None
    if args.calibration_input:
        from embforge.data.io import read_texts

        texts = read_texts(args.calibration_input, field=args.field)
    model = load_model(args)
    out = export_onnx(
        model,
        args.output,
        quantize=args.int8,
        quantize_ffn_down=args.int8_ffn_down,
        openvino=args.openvino,
        calibration_texts=texts,
        source=args.model,
    )
    extra = " (+ int8 for ONNX Runtime and OpenVINO)" if args.openvino else " (+ int8)" if args.int8 else ""
    print(f"wrote ONNX model{extra} to {out}")
    return 0
