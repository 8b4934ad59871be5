"""What several command groups share: the model flags and loading, ``--on-bad-record`` and shards.

Stdlib, embforge.errors and the (stdlib-only) head spec's name lists at import time: every handler imports its heavy parts itself.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from embforge.config import PrecisionName
from embforge.errors import ConfigError
from embforge.modeling.head import ATTENTIONS, PARAMETER_FREE_POOLINGS

Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns: each group adds its commands


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="known model name (e.g. all-MiniLM-L6-v2) or a model folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=None, help="override the model's max sequence length")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--pooling", choices=PARAMETER_FREE_POOLINGS, default=None, help="override the model's pooling")
    p.add_argument(
        "--new-head", action="store_true", help="with --pooling: replace the folder's trained head (else an error)"
    )
    p.add_argument("--attention", choices=ATTENTIONS, default=None, help="decoders: override the attention")
    add_precision_arg(p)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=typing.get_args(PrecisionName),
        default=None,
        help="PyTorch models: auto (default) = bf16 autocast where the device runs bf16 natively, else fp32",
    )


def load_model(args: argparse.Namespace):
    from embforge.models.embedder import Embedder

    return Embedder.load(args.model, device=args.device, **model_overrides(args))


def model_overrides(args: argparse.Namespace) -> dict:
    """The model flags the user set (``--max-seq-len``, ``--pooling``, ``--new-head``, ``--attention``, ``--precision``)."""
    keys = ("max_seq_len", "pooling", "new_head", "attention", "precision")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None)}


def load_inference_model(args: argparse.Namespace):
    """The Embedder, or an OnnxEmbedder for a folder written by `embforge export onnx` (no torch import)."""
    from embforge.onnx.runtime import OnnxEmbedder, is_onnx_folder

    runtime = getattr(args, "runtime", None)
    if is_onnx_folder(args.model):
        if getattr(args, "precision", None):
            raise ConfigError("--precision applies to PyTorch models; an ONNX folder runs fp32 (or --int8)")
        return OnnxEmbedder.load(args.model, quantized=args.int8, runtime=runtime or "onnxruntime")
    if args.int8 or runtime:
        flag = "--int8" if args.int8 else "--runtime"
        raise ConfigError(f"{flag} needs an ONNX folder: run `embforge export onnx MODEL OUT --int8` first")
    return load_model(args)


def add_on_bad_record(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        default=default,
        help=f"a bad input line: stop naming file:line, or skip it and count it by reason (default: {default})",
    )


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL training records; a glob for shards")
    p.add_argument(
        "--output",
        required=True,
        help="JSONL of the kept records (a folder for shards: one file per input shard, shard i on rank i %% world)",
    )


def shard_paths(input_arg: str, output_arg: str) -> tuple[list[Path], list[Path]]:
    """``--input`` (a file or a glob of shards) and ``--output`` (a file, or a folder: one file per shard)."""
    import glob

    inputs = [Path(p) for p in sorted(glob.glob(input_arg))] or [Path(input_arg)]
    if len(inputs) == 1 and not Path(output_arg).is_dir():
        return inputs, [Path(output_arg)]
    return inputs, [Path(output_arg) / p.name for p in inputs]
