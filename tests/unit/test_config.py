from dataclasses import dataclass, field
from typing import Literal

import pytest

from embforge.config import apply_overrides, from_dict, load_config, to_dict
from embforge.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 0


@dataclass
class Stage:
    name: str
    pooling: Literal["mean", "cls", "last"] = "mean"
    optim: Optim = field(default_factory=Optim)
    dims: list[int] = field(default_factory=list)
    note: str | None = None


@dataclass
class Recipe:
    stages: list[Stage]
    seed: int = 0


def test_round_trip_and_defaults():
    r = from_dict(Recipe, {"stages": [{"name": "s1", "optim": {"lr": 2e-5}}], "seed": 3})
    assert r.stages[0].optim.lr == 2e-5 and r.stages[0].optim.warmup_steps == 0 and r.seed == 3
    assert from_dict(Recipe, to_dict(r)) == r


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(
        ConfigError, match=r"unknown key 'stages\[0\]\.optim\.warmup_step' \(did you mean 'warmup_steps'\?\)"
    ):
        from_dict(Recipe, {"stages": [{"name": "s", "optim": {"warmup_step": 5}}]})


def test_wrong_type_and_literal_choice():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.optim\.lr: expected a number"):
        from_dict(Recipe, {"stages": [{"name": "s", "optim": {"lr": "fast"}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.pooling: 'maen' is not one of .*did you mean 'mean'"):
        from_dict(Recipe, {"stages": [{"name": "s", "pooling": "maen"}]})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Recipe, {"stages": [], "seed": True})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key 'stages\[0\]\.name'"):
        from_dict(Recipe, {"stages": [{}]})


def test_overrides_nested_list_index_and_yaml_values():
    data = {"stages": [{"name": "a"}, {"name": "b"}]}
    apply_overrides(data, ["stages.1.optim.lr=1.5e-5", "stages.0.dims=[64, 128]", "seed=7"])
    r = from_dict(Recipe, data)
    assert r.stages[1].optim.lr == 1.5e-5 and r.stages[0].dims == [64, 128] and r.seed == 7


def test_bad_overrides():
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="expected an index below 1"):
        apply_overrides({"stages": [{"name": "a"}]}, ["stages.3.name=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*did you mean 'seed'"):
        from_dict(Recipe, apply_overrides({"stages": []}, ["sed=1"]))


def test_load_config_names_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - name: s\n    poolin: cls\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'stages\[0\]\.poolin' \(did you mean 'pooling'\?\)"):
        load_config(Recipe, p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Recipe, tmp_path / "missing.yaml")
    p.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Recipe, p)
