"""``embforge`` command line. Heavy imports (torch, transformers) happen inside handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embforge.errors import ConfigError, EmbforgeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="known model name (e.g. all-MiniLM-L6-v2) or a model folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=None, help="override the model's max sequence length")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None, help="override the model's pooling")
    p.add_argument(
        "--new-head", action="store_true", help="with --pooling: replace the folder's trained head (else an error)"
    )
    p.add_argument(
        "--attention", choices=["bidirectional", "causal"], default=None, help="decoders: override the attention"
    )
    _add_precision_arg(p)


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],  # embforge.precision.PRECISIONS (not imported: it imports torch)
        default=None,
        help="PyTorch models: auto (default) = bf16 autocast where the device runs bf16 natively, else fp32",
    )


def _load_model(args: argparse.Namespace):
    from embforge.models.embedder import Embedder

    return Embedder.load(args.model, device=args.device, **_model_overrides(args))


def _model_overrides(args: argparse.Namespace) -> dict:
    """The model flags the user set (``--max-seq-len``, ``--pooling``, ``--new-head``, ``--attention``, ``--precision``)."""
    keys = ("max_seq_len", "pooling", "new_head", "attention", "precision")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None)}


def _load_inference_model(args: argparse.Namespace):
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
    return _load_model(args)


def cmd_encode(args: argparse.Namespace) -> int:
    from embforge.data.io import read_texts, save_npy

    texts = read_texts(args.input, field=args.field)
    model = _load_inference_model(args)
    emb = model.encode(
        texts, batch_size=args.batch_size, prompt_name=args.prompt_name, dimensions=args.dimensions, show_progress=True
    )
    save_npy(args.output, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import random

    from embforge.data.io import read_texts
    from embforge.quantization import calibrate

    if args.output is None and not Path(args.model).is_dir():
        raise ConfigError(f"{args.model} is not a model folder: give --output FILE for its calibration")
    texts = read_texts(args.input, field=args.field)
    if len(texts) > args.sample:
        texts = random.Random(args.seed).sample(texts, args.sample)
    model = _load_inference_model(args)
    full = model.encode(texts, batch_size=args.batch_size, prompt_name=args.prompt_name, show_progress=True)
    widths = [int(d) for d in args.dimensions.split(",")] if args.dimensions else []
    calibration = calibrate(full, widths, bool(model.normalize), args.prompt_name)
    out = calibration.save(args.output or args.model)
    print(f"wrote int8/uint8 ranges for {sorted(calibration.ranges)} dimensions from {len(texts)} texts to {out}")
    return 0


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
        backend = backend_for(_load_inference_model(one), name, adapters)
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
    from embforge.eval.tasks import InstructionTable

    source = args.instructions
    if source == "nv-embed":
        source = str(Path(__file__).parent / "recipes" / "nv_embed" / "instructions.yaml")
    elif source is None:
        beside = Path(model) / "instructions.yaml"
        if not beside.is_file():
            return {}
        source = str(beside)
    table = from_dict(InstructionTable, read_yaml(source), source)
    return {**table.by_type, **table.by_task}


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
    model = _load_model(args)
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


def _add_on_bad_record(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        default=default,
        help=f"a bad input line: stop naming file:line, or skip it and count it by reason (default: {default})",
    )


def _shard_paths(input_arg: str, output_arg: str) -> tuple[list[Path], list[Path]]:
    """``--input`` (a file or a glob of shards) and ``--output`` (a file, or a folder: one file per shard)."""
    import glob

    inputs = [Path(p) for p in sorted(glob.glob(input_arg))] or [Path(input_arg)]
    if len(inputs) == 1 and not Path(output_arg).is_dir():
        return inputs, [Path(output_arg)]
    return inputs, [Path(output_arg) / p.name for p in inputs]


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL training records; a glob for shards")
    p.add_argument(
        "--output",
        required=True,
        help="JSONL of the kept records (a folder for shards: one file per input shard, shard i on rank i %% world)",
    )


def cmd_mine(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from embforge.data.mining import MiningConfig, mine_shards, read_corpus
    from embforge.models.embedder import Embedder
    from embforge.train.parallel import distributed_session

    cfg = MiningConfig(
        num_negatives=args.num_negatives,
        range_min=args.range_min,
        range_max=args.range_max,
        max_score_ratio=None if args.max_score_ratio <= 0 else args.max_score_ratio,
        margin=args.margin,
        sampling=args.sampling,
        seed=args.seed,
        index=args.index,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        query_prompt_name=args.query_prompt_name,
        document_prompt_name=args.document_prompt_name,
        on_bad_record=args.on_bad_record,
    )
    inputs, outputs = _shard_paths(args.input, args.output)
    corpus = read_corpus(Path(args.corpus)) if args.corpus else None
    with distributed_session() as info:  # under torchrun, each rank mines every world-th shard
        teacher = Embedder.load(args.model, device=args.device or info.device, **_model_overrides(args))
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


def cmd_filter(args: argparse.Namespace) -> int:
    from embforge.data.filtering import clean_shards, consistency_filter_shards
    from embforge.train.parallel import distributed_session

    if args.filter_kind == "clean" and args.near_duplicates is not None and args.model is None:
        raise ConfigError("filter clean --near-duplicates needs a teacher MODEL argument")
    inputs, outputs = _shard_paths(args.input, args.output)
    with distributed_session() as info:  # under torchrun, each rank writes every world-th shard
        teacher = None
        if args.filter_kind == "consistency" or args.near_duplicates is not None:
            from embforge.models.embedder import Embedder

            teacher = Embedder.load(args.model, device=args.device or info.device, **_model_overrides(args))
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


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from embforge.config import load_config
    from embforge.data.synthetic import SynthConfig, generate

    cfg = load_config(SynthConfig, args.config, args.set)
    with tqdm(total=cfg.num_tasks * cfg.examples_per_task, desc="synth", unit="example") as bar:
        stats = generate(cfg, progress=bar.update)
    print(json.dumps(dict(stats), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from embforge.train.parallel import distributed_session
    from embforge.train.recipe import load_recipe
    from embforge.train.stages import run_recipe

    recipe, data_root = load_recipe(args.recipe, args.set)
    with distributed_session() as info:  # under torchrun: join the group, and leave it cleanly
        run_recipe(recipe, data_root, resume=not args.no_resume, info=info)
    print(f"final model: {recipe.output_dir}/final")
    return 0


def cmd_pretrain_mlm(args: argparse.Namespace) -> int:
    from embforge.train.mlm import train_mlm
    from embforge.train.mlm_recipe import MLMRecipeConfig
    from embforge.train.recipe import load_recipe

    recipe, data_root = load_recipe(args.recipe, args.set, schema=MLMRecipeConfig)
    summary = train_mlm(recipe, data_root, resume=not args.no_resume, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from embforge.train.plan import format_plan, plan_recipe
    from embforge.train.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, args.set)
    embedder, plans = plan_recipe(recipe, gpus=args.gpus)
    print(format_plan(embedder, plans, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, parallel=recipe.parallel))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from embforge.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), model_name=args.model)
    return 0


def cmd_nomic_cpu(args: argparse.Namespace) -> int:
    from embforge.errors import DataError
    from embforge.nomic_cpu import run_nomic_cpu

    shared = Path(args.data_root)
    if not (shared / "wikitext2").is_dir():
        raise DataError(f"{shared}: not the shared datasets folder (no wikitext2/); pass --data-root")
    run_nomic_cpu(Path(args.output_dir), shared, Path(args.tasks))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from embforge.train.distill import distill_recipe
    from embforge.train.parallel import distributed_session
    from embforge.train.stages import run_recipe

    recipe, data_root = distill_recipe(
        args.student,
        args.teacher,
        args.data,
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_seq_len=args.max_seq_len,
        contrastive_weight=args.contrastive_weight,
        embedding=args.embedding,
        kl_weight=args.kl_weight,
        temperature=args.temperature,
        teacher_query_prompt=args.teacher_query_prompt,
        teacher_document_prompt=args.teacher_document_prompt,
        cache_dir=args.cache_dir,
        precision=args.precision or "auto",
    )
    with distributed_session() as info:
        run_recipe(recipe, data_root, info=info)
    print(f"final model: {recipe.output_dir}/final")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from embforge.adapt.pipeline import AdaptSettings, adapt

    settings = AdaptSettings(
        model=args.model,
        data=str(Path(args.data).resolve()),
        teacher=args.teacher,
        minutes=args.minutes,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        max_negative_ratio=args.max_negative_ratio,
        lr=args.lr,
        max_seq_len=args.max_seq_len,
        pseudo=not args.no_pseudo,
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


MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")  # models.merging.METHODS


def cmd_merge(args: argparse.Namespace) -> int:
    from embforge.models.merging import merge

    if args.checkpoints is not None:
        from embforge.train.averaging import average_checkpoints

        if args.models or args.method != "linear":
            raise SystemExit("merge --checkpoints averages a stage's checkpoints (linear); give no model folders")
        out = average_checkpoints(args.checkpoints, args.output, last=args.last, weights=args.weights, dtype=args.dtype)
        print(f"averaged the last {args.last} checkpoints of {args.checkpoints} into {out}")
        return 0
    if not args.models:
        raise SystemExit("merge: give model folders, or --checkpoints STAGE_DIR")
    out = merge(
        args.models,
        args.output,
        method=args.method,
        weights=args.weights,
        t=args.t,
        base=args.base,
        density=args.density,
        scale=args.scale,
        seed=args.seed,
        dtype=args.dtype or "float32",
    )
    print(f"merged {len(args.models)} models ({args.method}) into {out}")
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
    p.add_argument("--int8", action="store_true", help="ONNX folder: run the int8-quantised model")
    p.add_argument(
        "--runtime",
        choices=["onnxruntime", "openvino"],
        default=None,
        help="ONNX folder: the runtime that runs it (default: onnxruntime)",
    )
    p.set_defaults(func=cmd_encode)

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
    _add_precision_arg(p)
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

    p = sub.add_parser("calibrate", help="int8/uint8 output ranges from a sample of your corpus (for serve)")
    _add_model_args(p)
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl sample of your corpus")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--sample", type=int, default=5000, help="texts drawn (with --seed) from the input at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dimensions", default=None, help="comma-separated widths to calibrate (default: the full one)")
    p.add_argument("--prompt-name", default=None, help="the prompt documents are embedded with (e.g. document)")
    p.add_argument("--int8", action="store_true", help="ONNX folder: embed with the int8-quantised model")
    p.add_argument("--output", default=None, help="the file to write (default: MODEL/calibration.json)")
    p.set_defaults(func=cmd_calibrate)

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

    p = sub.add_parser("eval", help="MTEB-style evaluation on local files")
    _add_model_args(p)
    p.add_argument("--tasks", required=True, help="task file (YAML)")
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--only", nargs="+", default=None, help="run only these task names")
    p.add_argument("--data-root", default=None, help="override the task file's data_root")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a task-file key")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("mine", help="mine hard negatives with a teacher model (positive-aware)")
    _add_model_args(p)
    p.add_argument("--input", required=True, help="JSONL with query and positive (or positives); a glob for shards")
    p.add_argument(
        "--output", required=True, help="JSONL with negatives, negative_scores, positive_score (a folder for shards)"
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="candidate texts (.txt, .jsonl or BEIR corpus.jsonl); default: the input's positives",
    )
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
    _add_on_bad_record(p, "error")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("filter", help="consistency filtering (Nomic) or dedup/hygiene of training pairs")
    fsub = p.add_subparsers(dest="filter_kind", required=True)
    c = fsub.add_parser(
        "consistency",
        help="keep a pair only if its document is in the query's top-k (per shard and source, chunked, streamed)",
    )
    _add_model_args(c)
    _add_shard_args(c)
    c.add_argument("--top-k", type=int, default=2)
    c.add_argument("--chunk-pairs", type=int, default=1_000_000, help="pairs compared at once within a source")
    c.add_argument("--source-field", default="source")
    c.add_argument("--query-prompt-name", default=None)
    c.add_argument("--document-prompt-name", default=None)
    _add_on_bad_record(c, "error")
    c.set_defaults(func=cmd_filter)
    c = fsub.add_parser(
        "clean",
        help="drop empty, too short/long, duplicate and near-duplicate pairs (duplicates are found within each shard)",
    )
    c.add_argument("model", nargs="?", default=None, help="teacher for --near-duplicates")
    _add_shard_args(c)
    c.add_argument("--min-chars", type=int, default=1)
    c.add_argument("--max-chars", type=int, default=None)
    c.add_argument(
        "--near-duplicates", type=float, default=None, metavar="COSINE", help="also drop near duplicates (needs MODEL)"
    )
    c.add_argument("--chunk-pairs", type=int, default=4096, help="pairs embedded at once for --near-duplicates")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-seq-len", type=int, default=None)
    c.add_argument("--device", default=None)
    _add_on_bad_record(c, "skip")
    c.set_defaults(func=cmd_filter)

    p = sub.add_parser("synth", help="generate synthetic retrieval examples with an OpenAI-compatible chat endpoint")
    p.add_argument("config", help="YAML: endpoint, model, output, num_tasks, examples_per_task, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="run a multi-stage training recipe (also under torchrun)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start fresh: refuse (instead of resuming) if output_dir already holds checkpoints",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("adapt", help="adapt a model to your corpus (BEIR folder): pairs, filter, mine, train, merge")
    p.add_argument("model", help="the base model: a packaged name or a folder")
    p.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl [+ queries.jsonl and qrels/train.tsv]")
    p.add_argument("--output", required=True, help="run folder: OUTPUT/final, OUTPUT/report.{md,json,png}")
    p.add_argument("--minutes", type=float, default=30.0, help="the whole run's time budget (training fills it)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: what the budget allows)")
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
    p.add_argument("--no-pseudo", action="store_true", help="with labelled pairs: train on them alone")
    p.add_argument("--llm-endpoint", default=None, help="OpenAI-compatible base URL for LLM-written queries")
    p.add_argument("--llm-model", default=None)
    p.add_argument("--llm-queries", type=int, default=0, help="passages to ask the LLM a query for")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("distill", help="train a student to match a teacher embedder (+ InfoNCE), teacher cached")
    p.add_argument("student", help="the student: a packaged model name or a folder")
    p.add_argument("--teacher", required=True, help="the teacher: a packaged model name or a folder")
    p.add_argument("--data", required=True, help="a JSONL file of {query, positive} records, or a BEIR folder")
    p.add_argument("--output", required=True, help="run folder; the student is saved to OUTPUT/final")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-seq-len", type=int, default=None, help="the student's (default: its folder's)")
    p.add_argument("--temperature", type=float, default=0.05, help="τ of InfoNCE and of the student's softmax")
    p.add_argument("--contrastive-weight", type=float, default=1.0, help="0: distillation alone")
    p.add_argument("--embedding", choices=["cosine", "mse", "none"], default="cosine", help="the embedding term")
    p.add_argument("--kl-weight", type=float, default=1.0, help="KL of the in-batch similarity distributions")
    p.add_argument("--teacher-query-prompt", default="", help="the teacher's prompt on queries")
    p.add_argument("--teacher-document-prompt", default="", help="the teacher's prompt on documents")
    p.add_argument("--cache-dir", default=None, help="teacher embeddings (default $EMBFORGE_CACHE/teacher-embeddings)")
    _add_precision_arg(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "merge", help="merge saved models: linear soup, slerp, task arithmetic, TIES, DARE (tensor by tensor)"
    )
    p.add_argument("models", nargs="*", help="model folders (or packaged names) of one architecture and tokenizer")
    p.add_argument("--output", required=True, help="the merged model folder")
    p.add_argument(
        "--checkpoints", default=None, metavar="STAGE_DIR", help="average a stage's last checkpoints instead"
    )
    p.add_argument("--last", type=int, default=3, help="--checkpoints: how many of the newest")
    p.add_argument("--method", default="linear", choices=MERGE_METHODS)
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one per model (linear: normalised)")
    p.add_argument("--t", type=float, default=0.5, help="slerp: 0 = the first model, 1 = the second")
    p.add_argument("--base", default=None, help="task methods: the model the task vectors are taken from")
    p.add_argument("--density", type=float, default=1.0, help="ties / dare: fraction of each task vector kept")
    p.add_argument("--scale", type=float, default=1.0, help="task methods: factor on the merged task vector")
    p.add_argument("--seed", type=int, default=0, help="dare's drop mask")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="of the merged weights (default float32; --checkpoints: the recipe's save_dtype)",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "pretrain-mlm", help="MLM pre-training of a nomic-bert from scratch (an `objective: mlm` recipe)"
    )
    p.add_argument("recipe", help="MLM recipe YAML, e.g. src/embforge/recipes/nomic_embed/cpu_mlm.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-resume", action="store_true", help="refuse (instead of resuming) if checkpoints exist")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_pretrain_mlm)

    p = sub.add_parser(
        "plan", help="per-GPU memory of a recipe (weights, LoRA, optimizer, activations) from the meta device"
    )
    p.add_argument("recipe", help="recipe YAML whose model is a backbone preset (e.g. mistral-7b)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "nomic-cpu",
        help="Nomic Embed at CPU size: MLM -> consistency-filtered contrastive -> fine-tune on ../shared/data, scored",
    )
    p.add_argument("--output-dir", default="runs/nomic_cpu")
    p.add_argument("--data-root", default="../shared/data", help="the shared datasets folder")
    p.add_argument("--tasks", default="tasks/shared_mteb.yaml", help="task file naming MLQuestions and DBPedia-Subset")
    p.set_defaults(func=cmd_nomic_cpu)

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
