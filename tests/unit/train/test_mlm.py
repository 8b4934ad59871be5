"""MLM pre-training: the loop learns, logs, plots, checkpoints, resumes and exports."""

import json
import random
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embforge.cli import main
from embforge.config import apply_overrides, from_dict, read_yaml
from embforge.errors import CheckpointError, ConfigError
from embforge.models.tiny import tiny_bert
from embforge.train.mlm import batch_indices, train_mlm
from embforge.train.mlm_recipe import MLMRecipeConfig
from embforge.train.recipe import load_recipe

RECIPES = sorted(
    p
    for p in Path(str(resources.files("embforge") / "recipes")).rglob("*.yaml")
    if read_yaml(p).get("objective") == "mlm"
)
SENTENCES = [
    "the cat runs fast",
    "the dog runs slow",
    "open the file and read data",
    "sort a list of number value",
    "search the text to find a match",
    "write the string to a file",
    "the red cat and the blue dog",
]
TINY_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 192,
    "max_trained_len": 64,
    "max_seq_len": 64,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(SENTENCES) for _ in range(4)) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    _, tokenizer = tiny_bert()
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def recipe(corpus, out, **changes) -> MLMRecipeConfig:
    data = {
        "objective": "mlm",
        "output_dir": str(out),
        "model": {"overrides": dict(TINY_MODEL), "tokenizer": str(corpus / "tokenizer")},
        "data": {"files": ["corpus.txt"], "format": "text", "chunk_len": 32, "heldout_fraction": 0.1},
        "steps": 60,
        "batch_size": 16,
        "warmup_fraction": 0.1,
        "optim": {"lr": 3e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 1e-5},
        "precision": "fp32",
        "log_every": 5,
        "eval_every": 20,
    }
    for key, value in changes.items():
        apply_overrides(data, [f"{key}={json.dumps(value)}"])
    return from_dict(MLMRecipeConfig, data)


def test_mlm_learns_logs_plots_and_exports(corpus, tmp_path):
    summary = train_mlm(recipe(corpus, tmp_path / "run"), corpus, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "loss" not in rows[0]
    acc = {r["step"]: r["eval/masked_acc"] for r in rows if "eval/masked_acc" in r}
    assert list(acc) == [0, 20, 40, 60] and summary["masked_acc_after"] == acc[60]
    # from chance, past the unigram plateau (predicting the commonest token, ~11 % here) by step 60
    assert acc[0] < 2 and acc[60] > 14 and acc[60] > acc[20] + 3
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert Path(summary["plot"]).stat().st_size > 1000
    assert (tmp_path / "run" / "checkpoints" / "step-00000060" / "model.safetensors").is_file()
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(summary["model"], local_files_only=True)  # a plain transformers folder
    assert type(exported).__name__ == "NomicBertModel"
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000060" / "model.safetensors"))
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in backbone.items())


def test_resume_continues_the_same_trajectory(corpus, tmp_path):
    straight = recipe(corpus, tmp_path / "a", steps=6, eval_every=0, log_every=1)
    train_mlm(straight, corpus, device="cpu")
    split = recipe(corpus, tmp_path / "b", steps=6, eval_every=0, log_every=1, save_every=3)
    train_mlm(split, corpus, device="cpu")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")  # as if it had crashed after step 3's checkpoint
    shutil.rmtree(tmp_path / "b" / "model")
    train_mlm(split, corpus, device="cpu")  # resumes from step 3
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open()) if "loss" in r]  # noqa: E731
    assert losses("a") == losses("b")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_mlm(split, corpus, resume=False, device="cpu")


def test_micro_batches_give_the_full_batch_gradient(corpus, tmp_path):
    train_mlm(recipe(corpus, tmp_path / "full", steps=2, eval_every=0), corpus, device="cpu")
    train_mlm(recipe(corpus, tmp_path / "micro", steps=2, eval_every=0, micro_batch_size=4), corpus, device="cpu")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "micro" / "checkpoints" / "step-00000002" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(s, 4, 10, seed=3) for s in range(5)])  # 20 draws = 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), batch_indices(2, 4, 10, seed=3))


def test_recipe_errors_name_the_key(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"model: unknown nomic-bert field 'num_layer'"):
        recipe(corpus, tmp_path, **{"model.overrides.num_layer": 2})
    with pytest.raises(ConfigError, match="chunk_len 128 exceeds the model's max_trained_len 64"):
        recipe(corpus, tmp_path, **{"data.chunk_len": 128})
    with pytest.raises(ConfigError, match="warmup_fraction or optim.warmup_steps, not both"):
        recipe(corpus, tmp_path, **{"optim.warmup_steps": 3})


def test_shipped_mlm_recipes_load_and_train_at_tiny_size(corpus, tmp_path):
    assert [p.name for p in RECIPES] == ["cpu_mlm.yaml", "cpu_twin_mlm.yaml", "mlm.yaml"]
    for path in RECIPES:
        full, _ = load_recipe(path, schema=MLMRecipeConfig)
        assert full.optim.betas == [0.9, 0.98] and full.optim.eps == 1e-6 and full.optim.weight_decay == 1e-5
        assert full.data.mask_prob == 0.3 and full.warmup_fraction == 0.06
        out = tmp_path / path.stem
        overrides = [
            f"output_dir={out}",
            f"data_root={corpus}",
            "data.files=[corpus.txt]",
            "data.format=text",
            "data.chunk_len=32",
            "data.heldout_fraction=0.1",
            f"model.tokenizer={corpus / 'tokenizer'}",
            f"model.overrides={json.dumps(TINY_MODEL)}",
            "steps=2",
            "batch_size=4",
            "micro_batch_size=2",
            "precision=fp32",
            "log_every=1",
            "eval_every=0",
        ]
        assert main(["pretrain-mlm", str(path), *[a for o in overrides for a in ("--set", o)]]) == 0
        assert (out / "model" / "config.json").is_file()
    full, _ = load_recipe(RECIPES[2], schema=MLMRecipeConfig)
    assert (full.data.chunk_len, full.batch_size, full.optim.lr, full.model.preset) == (
        2048,
        4096,
        5e-4,
        "nomic-bert-2048",
    )
