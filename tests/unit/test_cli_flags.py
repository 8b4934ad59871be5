"""Each config a command fills from its flags, checked against that command's parser.

A new field of MiningConfig, ServeSettings or AdaptSettings (or a new argument of
distill_recipe) fails here until its command has a flag for it, named as the field, with the
field's type, choices and default, or it is listed below as deliberately not a flag (or with
a different default), with why.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import subprocess
import sys
import types
import typing
from dataclasses import dataclass

import pytest

from embforge.cli import build_parser


@dataclass(frozen=True)
class Filled:
    """A config that ``embforge COMMAND`` fills from its flags."""

    command: tuple[str, ...]
    target: str  # "module:name": a dataclass, or a function whose arguments are the config
    internal: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> why it has no flag
    cli_default: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> why its flag's default differs
    inverted: dict[str, str] = dataclasses.field(default_factory=dict)  # bool field -> its --no-* flag's dest


FILLED = [
    Filled(
        ("mine",),
        "embforge.data.mining:MiningConfig",
        cli_default={"batch_size": "the model flags' --batch-size (32), as on encode and eval"},
    ),
    Filled(
        ("serve",),
        "embforge.serve.app:ServeSettings",
        internal={"retry_after_s": "the Retry-After of a 503: 1 s, no need to tune it"},
    ),
    Filled(
        ("adapt",),
        "embforge.adapt.settings:AdaptSettings",
        internal={
            name: "a tuned constant of the pipeline (report.json records it)"
            for name in ("temperature", "top_k", "holdout", "max_epochs", "tolerance", "eval_corpus", "labelled_share")
        },
    ),
    Filled(
        ("distill",),
        "embforge.train.distill:distill_recipe",
        internal={"seed": "embforge distill trains with seed 0 (no --seed flag yet)"},
        cli_default={"precision": "the shared --precision flag: unset means auto"},
    ),
]


def _subparser(command: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in command:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


def _target(spec: str):
    module, name = spec.split(":")
    if module == "embforge.serve.app":
        pytest.importorskip("fastapi")  # the `serve` extra
    return getattr(importlib.import_module(module), name)


def _fields(target) -> list[tuple[str, object, object]]:
    """(name, type, default) of a dataclass's fields or a function's arguments (default: MISSING)."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        return [(f.name, hints[f.name], f.default) for f in dataclasses.fields(target)]
    params = inspect.signature(target).parameters.values()
    return [(p.name, hints[p.name], dataclasses.MISSING if p.default is p.empty else p.default) for p in params]


def _wants(hint) -> object:
    """What a flag for a field of this type takes: a set of choices, bool, int, float or str."""
    if typing.get_origin(hint) is typing.Literal:
        return set(typing.get_args(hint))
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _wants(args[0]) if len(args) == 1 else str  # e.g. str | Path: given as text
    return hint if hint in (bool, int, float) else str


def flag_problems(filled: Filled, fields: list[tuple[str, object, object]], parser) -> list[str]:
    """What is wrong between ``fields`` and the flags of ``parser`` (empty: nothing)."""
    actions = {a.dest: a for a in parser._actions}
    command = "embforge " + " ".join(filled.command)
    problems = []
    for name, hint, default in fields:
        where = f"{filled.target.split(':')[1]}.{name} ({command})"
        if name in filled.internal:
            assert name not in actions, f"{where} is listed as internal but has a flag"
            continue
        if name in filled.inverted:
            action = actions.get(filled.inverted[name])
            if not (isinstance(action, argparse._StoreTrueAction) and default is True):
                problems.append(f"{where}: expected --{filled.inverted[name].replace('_', '-')} (store_true)")
            continue
        action = actions.get(name)
        if action is None:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{where} has no flag: add {flag}, or list it in this test's `internal` with why")
            continue
        wants = _wants(hint)
        if isinstance(wants, set):
            ok = set(action.choices or ()) == wants
        elif wants is bool:
            ok = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        else:
            ok = (action.type or str) is wants
        if not ok:
            problems.append(f"{where}: flag takes {action.choices or action.type}, the field is {hint}")
        if default is dataclasses.MISSING:
            if not (action.required or not action.option_strings):
                problems.append(f"{where}: the field has no default, the flag is optional")
        elif action.default != default and name not in filled.cli_default:
            problems.append(f"{where}: flag default {action.default!r}, field default {default!r}")
    return problems


@pytest.mark.parametrize("filled", FILLED, ids=[" ".join(f.command) for f in FILLED])
def test_every_field_of_the_config_a_command_fills_has_its_flag(filled):
    fields = _fields(_target(filled.target))
    names = {name for name, _, _ in fields}
    stale = sorted((set(filled.internal) | set(filled.cli_default) | set(filled.inverted)) - names)
    assert not stale, f"{filled.target} has no field {stale}: remove it from this test's tables"
    assert not flag_problems(filled, fields, _subparser(filled.command))


def test_the_check_finds_a_field_without_a_flag_and_a_wrong_default():
    from embforge.data.mining import MiningConfig

    @dataclass
    class Grown(MiningConfig):
        new_knob: int = 3

    (filled,) = [f for f in FILLED if f.command == ("mine",)]
    problems = flag_problems(filled, _fields(Grown), _subparser(filled.command))
    assert len(problems) == 1 and "MiningConfig.new_knob (embforge mine) has no flag: add --new-knob" in problems[0]
    no_excuse = dataclasses.replace(filled, cli_default={})
    (problem,) = flag_problems(no_excuse, _fields(MiningConfig), _subparser(filled.command))
    assert "MiningConfig.batch_size" in problem and "flag default 32, field default 64" in problem


def test_mine_fills_its_mining_config_from_the_flags_by_name():
    from embforge.cli.data import mining_config
    from embforge.data.mining import MiningConfig

    common = ["mine", "teacher", "--input", "in.jsonl", "--output", "out.jsonl"]
    assert mining_config(build_parser().parse_args(common)) == MiningConfig(batch_size=32)
    flags = ["--max-score-ratio", "0", "--sampling", "random", "--on-bad-record", "skip", "--range-max", "9"]
    assert mining_config(build_parser().parse_args([*common, *flags])) == MiningConfig(
        batch_size=32, max_score_ratio=None, sampling="random", on_bad_record="skip", range_max=9
    )


def test_building_the_parser_imports_no_torch():
    """`embforge --help` starts fast: every command group imports its heavy parts in its handlers."""
    code = (
        "import sys; from embforge.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
