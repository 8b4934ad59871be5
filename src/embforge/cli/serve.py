"""``embforge serve``: the OpenAI-compatible server, one or several models (and LoRA adapters)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embforge.cli.common import Subparsers, add_precision_arg, load_inference_model
from embforge.errors import ConfigError


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible embedding server (POST /v1/embeddings)")
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="[NAME=]known model name, model folder or ONNX folder (embforge export onnx); several: one id each",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters (Embedder.save(..., merge_lora=False)) served as model NAME on the first MODEL's weights",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set EMBFORGE_API_KEY)")
    p.add_argument(
        "--served-model-name", default=None, help="the id clients send as `model` (default: MODEL; one MODEL only)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (PyTorch models)")
    p.add_argument("--max-seq-len", type=int, default=None, help="override the model's max sequence length")
    p.add_argument("--int8", action="store_true", help="ONNX folder: serve the int8-quantised model")
    p.add_argument(
        "--runtime",
        choices=["onnxruntime", "openvino"],
        default=None,
        help="ONNX folder: the runtime that runs it (default: onnxruntime)",
    )
    add_precision_arg(p)
    # limits: ServeSettings (tests/unit/test_cli_flags.py checks each of its fields has a flag)
    p.add_argument("--max-items", type=int, default=2048, help="inputs per request")
    p.add_argument("--max-input-tokens", type=int, default=None, help="tokens per input (default: the model's max)")
    p.add_argument("--truncate", action="store_true", help="truncate over-long inputs instead of answering 413")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--max-batch-size", type=int, default=128, help="inputs per forward pass")
    p.add_argument("--max-queued-items", type=int, default=4096, help="queued inputs before 503 + Retry-After")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on stop")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--calibration",
        default=None,
        help="int8/uint8 ranges (embforge calibrate; default: MODEL/calibration.json where it exists)",
    )
    p.add_argument(
        "--instructions",
        default=None,
        help="instruction table for requests' `task` (YAML by_type/by_task, or nv-embed; "
        "default: MODEL/instructions.yaml where it exists)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    # OpenMP workers that spin between forward passes starve the event loop and tokenizer
    # threads on small machines: measured 3x fewer texts/s on 2 cores (docs/results.md).
    # Must be set before torch is imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from embforge.optional import require

    uvicorn = require("uvicorn")
    from embforge.serve.app import ServeSettings, create_app

    api_key = args.api_key or os.environ.get("EMBFORGE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"embforge: warning: serving on {args.host} without an API key", file=sys.stderr)
    settings = ServeSettings(
        api_key=api_key,
        max_items=args.max_items,
        truncate=args.truncate,
        max_body_bytes=args.max_body_bytes,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        max_queued_items=args.max_queued_items,
    )
    app = create_app(_served_models(args), settings)
    # on SIGINT/SIGTERM uvicorn stops accepting, finishes in-flight requests, then the app drains its queue
    uvicorn.run(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=args.graceful_timeout, log_level=args.log_level
    )
    return 0


def _pair(text: str, flag: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH -> (None, PATH)."""
    name, sep, path = text.partition("=")
    if not sep:
        return None, text
    if not name or not path:
        raise ConfigError(f"{flag}: expected NAME=PATH, got {text!r}")
    return name, path


def _served_models(args: argparse.Namespace) -> list:
    """The model ids of `embforge serve`: each MODEL ([NAME=]PATH), then each --lora-modules NAME=PATH
    on the first MODEL's weights."""
    from embforge.quantization import Calibration
    from embforge.serve.backend import backend_for
    from embforge.serve.requests import ServedModel

    several = len(args.models) > 1
    if several and (args.served_model_name or args.calibration):
        raise ConfigError(
            "--served-model-name and --calibration go with one MODEL; with several, name each as NAME=PATH "
            "and keep each model's calibration.json in its folder"
        )
    served = []
    for i, spec in enumerate(args.models):
        name, path = _pair(spec, "MODEL")
        name = name or args.served_model_name or path
        one = argparse.Namespace(**{**vars(args), "model": path})
        adapters = _adapter_modules(args.lora_modules) if i == 0 and args.lora_modules else None
        backend = backend_for(load_inference_model(one), name, adapters)
        calibration = _serving_calibration(args, path)
        instructions = _serving_instructions(args, path)
        common = {"instructions": instructions, "max_input_tokens": args.max_input_tokens}
        served.append(ServedModel(name, backend, aliases=(path,), calibration=calibration, **common))
        for adapter, folder in (adapters or {}).items():
            own = Calibration.find(folder)  # an adapter changes the embeddings: only its own ranges apply
            served.append(ServedModel(adapter, backend, adapter=adapter, calibration=own, **common))
    return served


def _adapter_modules(specs: list[str]) -> dict[str, str]:
    """--lora-modules NAME=PATH ... (one flag with several, or the flag repeated) -> NAME -> PATH."""
    from embforge.serve.batcher import MIXED

    adapters: dict[str, str] = {}
    for text in specs:
        name, path = _pair(text, "--lora-modules")
        if name is None:
            raise ConfigError(f"--lora-modules: expected NAME=PATH, got {text!r}")
        if name in adapters:
            raise ConfigError(f"--lora-modules: adapter name {name!r} is given twice")
        if name == MIXED:
            raise ConfigError(f"--lora-modules: {MIXED!r} labels the metrics of mixed passes; choose another name")
        adapters[name] = path
    return adapters


def _serving_calibration(args: argparse.Namespace, model: str):
    """--calibration FILE, else the model folder's calibration.json where it has one."""
    from embforge.quantization import Calibration

    if args.calibration:
        return Calibration.load(args.calibration)
    return Calibration.find(model) if Path(model).is_dir() else None


def _serving_instructions(args: argparse.Namespace, model: str) -> dict[str, str]:
    """--instructions FILE (or ``nv-embed``: the table shipped with the recipes), else MODEL/instructions.yaml.

    The file is an instruction table (``by_type`` / ``by_task``, as recipes and ``embforge eval``
    use); its task names and type names are what a request's ``task`` may pick.
    """
    from embforge.config import from_dict, read_yaml
    from embforge.eval.task_config import InstructionTable
    from embforge.train.recipe import recipe_path

    source = args.instructions
    if source == "nv-embed":
        source = str(recipe_path("nv_embed/instructions.yaml"))
    elif source is None:
        beside = Path(model) / "instructions.yaml"
        if not beside.is_file():
            return {}
        source = str(beside)
    table = from_dict(InstructionTable, read_yaml(source), source)
    return {**table.by_type, **table.by_task}
