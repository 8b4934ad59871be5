"""Every shipped recipe loads strictly and trains a step at tiny size."""

import json
from importlib import resources
from pathlib import Path

import pytest

from embforge.config import apply_overrides, from_dict, read_yaml
from embforge.errors import ConfigError
from embforge.train.parallel import DistInfo
from embforge.train.recipe import RecipeConfig, load_recipe
from embforge.train.stages import run_recipe

from .helpers import records, tiny_embedder

RECIPES = sorted(
    p
    for p in Path(str(resources.files("embforge") / "recipes")).rglob("*.yaml")
    if read_yaml(p).get("objective") != "mlm"
)  # MLM recipes (objective: mlm) are tested in test_mlm.py


def test_recipe_count():
    assert len(RECIPES) == 2, [r.name for r in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=[p.parent.name + "/" + p.name for p in RECIPES])
def test_shipped_recipe_builds_and_trains_at_tiny_size(path, tmp_path):
    recipe, _ = load_recipe(path)
    tiny = tiny_embedder().save(tmp_path / "tiny")
    for ds in {d.path for s in recipe.stages for d in s.data.datasets}:
        with (tmp_path / ds).open("w") as f:
            for r in records(40, num_negatives=3, seed=len(ds)):
                f.write(json.dumps({"query": r.query, "positive": r.positive, "negatives": r.negatives}) + "\n")
    overrides = [f"model.name_or_path={tiny}", "model.max_seq_len=32", f"output_dir={tmp_path / 'run'}"]
    for i, _stage in enumerate(recipe.stages):
        overrides += [
            f"stages.{i}.steps=2",
            f"stages.{i}.data.batch_size=4",
            f"stages.{i}.log_every=1",
            f"stages.{i}.precision=fp32",
        ]
    small = from_dict(RecipeConfig, apply_overrides(read_yaml(path), overrides))
    run_recipe(small, tmp_path, info=DistInfo())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_recipe_typo_is_reported_with_path_and_suggestion(tmp_path):
    (quickstart,) = [r for r in RECIPES if r.parent.name == "quickstart"]
    bad = tmp_path / "r.yaml"
    bad.write_text(quickstart.read_text().replace("num_negatives:", "num_negative:"))
    with pytest.raises(
        ConfigError, match=r"unknown key 'stages\[1\]\.data\.num_negative' \(did you mean 'num_negatives'\?\)"
    ):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\]\.optim\.lrr' \(did you mean 'lr'\?\)"):
        load_recipe(quickstart, ["stages.0.optim.lrr=1"])
