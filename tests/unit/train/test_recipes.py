"""Every shipped recipe loads strictly and trains a step at tiny size."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from embforge.config import apply_overrides, from_dict, read_yaml
from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_decoder
from embforge.train.parallel import DistInfo
from embforge.train.recipe import RecipeConfig, load_recipe
from embforge.train.stages import run_recipe

from .helpers import records, tiny_embedder

RECIPES = sorted(
    p
    for p in Path(str(resources.files("embforge") / "recipes")).rglob("*.yaml")
    if "stages" in read_yaml(p)
    and all(s.get("objective", "contrastive") == "contrastive" for s in read_yaml(p)["stages"])
)  # contrastive recipes; recipes with mlm stages are tested in test_mlm.py, instruction tables are not recipes


def test_recipe_count():
    assert len(RECIPES) == 9, [r.name for r in RECIPES]


def _write_dataset(path: Path, ds, seed: int) -> None:
    """Rows in the shape the dataset's format reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    words = [r.query for r in records(60, 0, seed)]
    if ds.format in ("classification", "clustering"):
        labels = sorted(ds.label_texts) if ds.label_texts else ["a", "b", "c"]
        rows = [{"text": w, "label": labels[i % len(labels)]} for i, w in enumerate(words)]
    elif ds.format == "sts":
        col = {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score", **(ds.fields or {})}
        rows = [
            {col["sentence1"]: a, col["sentence2"]: b, col["score"]: float(i % 6)}
            for i, (a, b) in enumerate(zip(words, words[1:]))
        ]
    else:
        rename = ds.fields or {}
        rows = [
            {
                rename.get("query", "query"): r.query,
                rename.get("positive", "positive"): r.positive,
                rename.get("negatives", "negatives"): r.negatives if "negatives" not in rename else r.negatives[0],
            }
            for r in records(40, num_negatives=3, seed=seed)
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("path", RECIPES, ids=[p.parent.name + "/" + p.name for p in RECIPES])
def test_shipped_recipe_builds_and_trains_at_tiny_size(path, tmp_path):
    recipe, _ = load_recipe(path)
    decoder = recipe.model.lora is not None or recipe.model.attention is not None
    if decoder:  # the NV-Embed recipes: a tiny Llama with the recipe's own head, attention and LoRA settings
        backbone, tokenizer = tiny_decoder("llama")
        template = "Instruct: {instruction}\nQuery: "  # a stage-2 recipe starts from a stage-1 model that has one
        tiny = Embedder(backbone, tokenizer, HeadSpec(instruction_template=template)).save(tmp_path / "tiny")
    else:
        tiny = tiny_embedder().save(tmp_path / "tiny")
    for i, ds in enumerate(d for s in recipe.stages for d in s.data.datasets):
        _write_dataset(tmp_path / ds.path, ds, seed=i)
    # mined negatives need the texts themselves: at 32 tokens the tiny tokenizer's instruction prompt
    # (40 tokens) truncates every text away and every sentence embeds alike. And a random tiny teacher
    # scores all sentences within a few percent of each other: the ceiling is the positive's score itself
    mines = any(d.negatives == "mined" for s in recipe.stages for d in s.data.datasets)
    overrides = [
        f"model.name_or_path={tiny}",
        f"model.max_seq_len={128 if mines else 32}",
        "model.dtype=float32",
        f"output_dir={tmp_path / 'run'}",
    ]
    if isinstance(read_yaml(path)["model"].get("pooling"), dict):
        overrides += ["model.pooling.head_dim=16", "model.pooling.num_latents=8"]
    for i, _stage in enumerate(recipe.stages):
        overrides += [
            f"stages.{i}.steps=2",
            f"stages.{i}.data.batch_size=4",
            f"stages.{i}.log_every=1",
            f"stages.{i}.precision=fp32",
            f"stages.{i}.data.num_negatives={min(_stage.data.num_negatives, 1)}",
        ]
        overrides += [
            f"stages.{i}.data.datasets.{j}.max_score_ratio=1.0"
            for j, ds in enumerate(_stage.data.datasets)
            if ds.negatives == "mined"
        ]
    small = from_dict(RecipeConfig, apply_overrides(read_yaml(path), overrides))
    trained = run_recipe(small, tmp_path, info=DistInfo())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    if decoder:
        again = Embedder.load(tmp_path / "run" / "final", device="cpu")
        assert again.head == trained.head
        texts = ["sort a list", "the cat"]
        fp32 = {"precision": "fp32"}
        assert np.allclose(again.encode(texts, prompt_name=None, **fp32), trained.encode(texts, **fp32), atol=1e-5)


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
