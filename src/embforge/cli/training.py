"""``embforge train``, ``distill``, ``merge`` and ``plan``: recipes run, planned and merged."""

from __future__ import annotations

import argparse

from embforge.cli.common import Subparsers, add_precision_arg

MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")  # models.merging.METHODS


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        aliases=["pretrain-mlm"],  # the pre-0.2 command of MLM recipes, which are now recipes like any other
        help="run a multi-stage training recipe: mlm and contrastive stages (also under torchrun)",
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start fresh: refuse (instead of resuming) if output_dir already holds checkpoints",
    )
    p.add_argument("--device", default=None, help="one process: cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from embforge.train.parallel import distributed_session
    from embforge.train.recipe import load_recipe
    from embforge.train.stages import run_recipe

    recipe, data_root = load_recipe(args.recipe, args.set)
    with distributed_session() as info:  # under torchrun: join the group, and leave it cleanly
        run_recipe(recipe, data_root, resume=not args.no_resume, info=info, device=args.device)
    print(f"final model: {recipe.output_dir}/final")
    return 0


def add_distill(sub: Subparsers) -> None:
    p = sub.add_parser("distill", help="train a student to match a teacher embedder (+ InfoNCE), teacher cached")
    p.add_argument("student", help="the student: a packaged model name or a folder")
    p.add_argument("--teacher", required=True, help="the teacher: a packaged model name or a folder")
    p.add_argument("--data", required=True, help="a JSONL file of {query, positive} records, or a BEIR folder")
    p.add_argument("--output", required=True, help="run folder; the student is saved to OUTPUT/final")
    # distill_recipe's keyword arguments (tests/unit/test_cli_flags.py checks each has a flag)
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
    add_precision_arg(p)
    p.set_defaults(func=cmd_distill)


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


def add_merge(sub: Subparsers) -> None:
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


def add_plan(sub: Subparsers) -> None:
    p = sub.add_parser(
        "plan", help="per-GPU memory of a recipe (weights, LoRA, optimizer, activations) from the meta device"
    )
    p.add_argument("recipe", help="recipe YAML whose model is a backbone preset (e.g. mistral-7b)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from embforge.train.plan import format_plan, plan_recipe
    from embforge.train.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, args.set)
    embedder, plans = plan_recipe(recipe, gpus=args.gpus)
    print(format_plan(embedder, plans, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, parallel=recipe.parallel))
    return 0
