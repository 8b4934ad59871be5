"""MLM stages (``objective: mlm``): the loop learns, logs, plots, checkpoints, resumes and saves;
MLM → contrastive is one recipe; pre-0.2 MLM recipe files still load."""

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
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_bert
from embforge.train.mlm import batch_indices, mlm_summary
from embforge.train.recipe import RecipeConfig, load_recipe
from embforge.train.stages import run_recipe

from .helpers import tiny_embedder

RECIPES = sorted(
    p
    for p in Path(str(resources.files("embforge") / "recipes")).rglob("*.yaml")
    if any(s.get("objective") == "mlm" for s in read_yaml(p).get("stages", []))
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


def recipe_dict(corpus, out, **changes) -> dict:
    """A one-stage MLM recipe on the tiny corpus; ``changes``: dotted keys of the stage (``steps``,
    ``mlm.batch_size``, ...) or of the recipe (``model.…``, ``seed``)."""
    data = {
        "output_dir": str(out),
        "data_root": str(corpus),
        "model": {
            "name_or_path": "nomic-bert-2048",
            "preset_overrides": dict(TINY_MODEL),
            "tokenizer": str(corpus / "tokenizer"),
        },
        "stages": [
            {
                "name": "mlm",
                "objective": "mlm",
                "steps": 60,
                "mlm": {
                    "files": ["corpus.txt"],
                    "format": "text",
                    "chunk_len": 32,
                    "heldout_fraction": 0.1,
                    "batch_size": 16,
                },
                "optim": {"lr": 3e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 1e-5, "warmup_fraction": 0.1},
                "precision": "fp32",
                "log_every": 5,
                "eval_every": 20,
            }
        ],
    }
    for key, value in changes.items():
        where = key if key.split(".")[0] in ("model", "seed", "output_dir") else f"stages.0.{key}"
        apply_overrides(data, [f"{where}={json.dumps(value)}"])
    return data


def recipe(corpus, out, **changes) -> RecipeConfig:
    return from_dict(RecipeConfig, recipe_dict(corpus, out, **changes))


def train_mlm(recipe: RecipeConfig, corpus, resume: bool = True) -> list[dict]:
    """Run the recipe on one CPU process; the MLM stage's logged rows."""
    run_recipe(recipe, corpus, resume=resume, device="cpu")
    return [json.loads(line) for line in (Path(recipe.output_dir) / "01-mlm" / "metrics.jsonl").open()]


def test_mlm_learns_logs_plots_and_saves(corpus, tmp_path):
    rows = train_mlm(recipe(corpus, tmp_path / "run"), corpus)
    assert rows[0]["step"] == 0 and "loss" not in rows[0]
    acc = {r["step"]: r["eval/masked_acc"] for r in rows if "eval/masked_acc" in r}
    assert list(acc) == [0, 20, 40, 60] and mlm_summary(rows) == {
        "masked_acc_before": acc[0],
        "masked_acc_after": acc[60],
    }
    # from chance, past the unigram plateau (predicting the commonest token, ~11 % here) by step 60
    assert acc[0] < 2 and acc[60] > 14 and acc[60] > acc[20] + 3
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    checkpoint = tmp_path / "run" / "01-mlm" / "checkpoints" / "step-00000060" / "model.safetensors"
    state = load_file(str(checkpoint))
    assert any(k.startswith("head.") for k in state)  # the MLM head trains in the stage's checkpoints ...
    saved = Embedder.load(tmp_path / "run" / "final", device="cpu")  # ... and the model is the backbone alone
    assert type(saved.backbone).__name__ == "NomicBertModel" and saved.pooler.config() == {"name": "mean"}
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    own = saved.backbone.state_dict()
    assert backbone and all(torch.equal(own[k], v) for k, v in backbone.items() if k in own)
    assert set(own) <= set(backbone)


def test_resume_continues_the_same_trajectory(corpus, tmp_path):
    straight = recipe(corpus, tmp_path / "a", steps=6, eval_every=0, log_every=1)
    train_mlm(straight, corpus)
    split = recipe(corpus, tmp_path / "b", steps=6, eval_every=0, log_every=1, save_every=3)
    train_mlm(split, corpus)
    stage = tmp_path / "b" / "01-mlm"
    shutil.rmtree(stage / "checkpoints" / "step-00000006")  # as if it had crashed after step 3's checkpoint
    shutil.rmtree(stage / "model")
    shutil.rmtree(tmp_path / "b" / "final")
    train_mlm(split, corpus)  # resumes from step 3
    last = "01-mlm/checkpoints/step-00000006/model.safetensors"
    a, b = load_file(str(tmp_path / "a" / last)), load_file(str(tmp_path / "b" / last))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: str) -> list[float]:
        rows = map(json.loads, (tmp_path / run / "01-mlm" / "metrics.jsonl").open())
        return [r["loss"] for r in rows if "loss" in r]

    assert losses("a") == losses("b")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_mlm(split, corpus, resume=False)


def test_micro_batches_give_the_full_batch_gradient(corpus, tmp_path):
    train_mlm(recipe(corpus, tmp_path / "full", steps=2, eval_every=0), corpus)
    train_mlm(recipe(corpus, tmp_path / "micro", steps=2, eval_every=0, **{"mlm.micro_batch_size": 4}), corpus)
    last = "01-mlm/checkpoints/step-00000002/model.safetensors"
    a, b = load_file(str(tmp_path / "full" / last)), load_file(str(tmp_path / "micro" / last))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def test_warmup_fraction_is_a_share_of_the_stage_steps(corpus, tmp_path):
    lrs = lambda rows: [r["lr"] for r in rows if "lr" in r]  # noqa: E731
    short = {"steps": 4, "eval_every": 0, "log_every": 1}
    by_fraction = train_mlm(recipe(corpus, tmp_path / "f", **short, **{"optim.warmup_fraction": 0.5}), corpus)
    by_steps = recipe(corpus, tmp_path / "s", **short, **{"optim.warmup_fraction": None, "optim.warmup_steps": 2})
    # the rate after each step: 2 warm-up steps ((s + 1) / 2 of 3e-3), then linear decay over the other 2
    assert lrs(by_fraction) == lrs(train_mlm(by_steps, corpus)) == pytest.approx([3e-3, 3e-3, 1.5e-3, 0.0])


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(s, 4, 10, seed=3) for s in range(5)])  # 20 draws = 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), batch_indices(2, 4, 10, seed=3))


def test_recipe_errors_name_the_key(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"model: unknown nomic-bert field 'num_layer'"):
        recipe(corpus, tmp_path, **{"model.preset_overrides.num_layer": 2})
    with pytest.raises(ConfigError, match=r"stages.0.mlm.chunk_len 128 exceeds the model's max_trained_len 64"):
        recipe(corpus, tmp_path, **{"mlm.chunk_len": 128})
    with pytest.raises(ConfigError, match="warmup_fraction or warmup_steps, not both"):
        recipe(corpus, tmp_path, **{"optim.warmup_steps": 3})
    with pytest.raises(ConfigError, match="an mlm stage needs an mlm block .* takes no data, grad_cache_chunk"):
        recipe(corpus, tmp_path, data={"datasets": [{"name": "x", "path": "x.jsonl"}]}, grad_cache_chunk=4)
    with pytest.raises(ConfigError, match="a contrastive stage needs a data block and no mlm block"):
        recipe(corpus, tmp_path, objective="contrastive")
    no_tokenizer = recipe(corpus, tmp_path, **{"model.tokenizer": None})
    with pytest.raises(ConfigError, match="has no weights and no tokenizer: give model.tokenizer"):
        run_recipe(no_tokenizer, corpus, device="cpu")


def test_mlm_stage_settings_that_cannot_apply_fail_at_load(corpus, tmp_path):
    for change, message in [
        ({"eval_only": ["STS13"]}, "takes no eval_only"),
        ({"best_metric": "eval/STS13"}, "takes no best_metric"),
        ({"optim.head_lr": 1e-3}, r"takes no optim.head_lr / head_warmup_steps"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"model.name_or_path": "smollm2-135m", "model.preset_overrides": None}, "an mlm stage trains a nomic-bert"),
        ({"model.lora": {"r": 4}}, "LoRA would train adapters on a frozen random backbone"),
    ]:
        with pytest.raises(ConfigError, match=message):
            recipe(corpus, tmp_path, **change)
    data = recipe_dict(corpus, tmp_path)
    data["parallel"] = "fsdp"
    with pytest.raises(ConfigError, match=r"parallel: mlm stages \(stages.0\) run under ddp, not fsdp"):
        from_dict(RecipeConfig, data)


def test_the_mlm_head_does_not_copy_the_backbone_init(corpus):
    """The stage reseeds torch with the seed the backbone was built from; the head has its own seed."""
    from embforge.models.build import build_embedder
    from embforge.train.mlm import mlm_model

    spec = recipe(corpus, corpus / "unused").model
    torch.manual_seed(0)
    embedder = build_embedder(spec)
    torch.manual_seed(0)
    head = mlm_model(embedder, seed=0).head.dense.weight.flatten()
    firsts = [p.flatten()[: len(head)] for p in embedder.backbone.parameters() if p.numel() >= len(head)]
    assert not any(torch.allclose(head[: len(f)], f) for f in firsts)
    assert torch.equal(mlm_model(embedder, seed=0).head.dense.weight.flatten(), head)  # and is reproducible


def test_checkpoints_of_an_mlm_stage_average(corpus, tmp_path):
    from embforge.train.averaging import average_checkpoints

    train_mlm(recipe(corpus, tmp_path / "run", steps=4, eval_every=0, save_every=2), corpus)
    out = average_checkpoints(tmp_path / "run" / "01-mlm", tmp_path / "avg", last=2)
    a = load_file(str(tmp_path / "run" / "01-mlm" / "checkpoints" / "step-00000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "01-mlm" / "checkpoints" / "step-00000004" / "model.safetensors"))
    averaged = Embedder.load(out, device="cpu").backbone.state_dict()
    key = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(averaged[key], (a[f"backbone.{key}"] + b[f"backbone.{key}"]) / 2)


def test_an_mlm_stage_needs_a_nomic_bert(corpus, tmp_path):
    tiny_embedder().save(tmp_path / "bert")
    data = recipe_dict(corpus, tmp_path / "run", steps=1)
    data["model"] = {"name_or_path": str(tmp_path / "bert")}
    with pytest.raises(ConfigError, match="an mlm stage trains a nomic-bert backbone; this model's is BertModel"):
        run_recipe(from_dict(RecipeConfig, data), corpus, device="cpu")
    for key in ("preset_overrides", "tokenizer"):  # a folder has its own shape and tokenizer
        data["model"] = {"name_or_path": str(tmp_path / "bert"), key: {"num_layers": 2} if key != "tokenizer" else "x"}
        with pytest.raises(ConfigError, match="model.preset_overrides and model.tokenizer apply to backbone presets"):
            run_recipe(from_dict(RecipeConfig, data), corpus, device="cpu")


def test_mlm_then_contrastive_is_one_recipe(corpus, tmp_path):
    """MLM → contrastive in one file and one ``embforge train``: stage 2 continues from stage 1's
    backbone in memory, and a resumed run skips the finished MLM stage (its checkpoint holds the head)."""
    pairs = [{"query": s, "positive": s.replace("the ", "a ")} for s in SENTENCES]
    (corpus / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    data = recipe_dict(corpus, tmp_path / "run", steps=3, eval_every=0, log_every=1)
    contrastive = {"name": "pairs", "steps": 2, "precision": "fp32", "log_every": 1}
    contrastive["data"] = {"batch_size": 4, "datasets": [{"name": "pairs", "path": "pairs.jsonl"}]}
    data["stages"].append(contrastive)
    (tmp_path / "two.yaml").write_text(json.dumps(data))
    assert main(["train", str(tmp_path / "two.yaml"), "--device", "cpu"]) == 0
    mlm_state = load_file(str(tmp_path / "run" / "01-mlm" / "checkpoints" / "step-00000003" / "model.safetensors"))
    pairs_dir = tmp_path / "run" / "02-pairs"
    rows = [json.loads(x) for x in (pairs_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    # stage 2 started from stage 1's trained backbone, not from a new random one: its first step moved
    # the weights by one AdamW step from stage 1's (lr 2e-5 x at most ~1 per weight), not by init noise
    final = Embedder.load(tmp_path / "run" / "final", device="cpu").backbone.state_dict()
    start = {k.removeprefix("backbone."): v for k, v in mlm_state.items() if k.startswith("backbone.")}
    assert max(float((final[k] - start[k]).abs().max()) for k in final) < 1e-3
    before = (pairs_dir / "metrics.jsonl").read_text()
    assert main(["train", str(tmp_path / "two.yaml"), "--device", "cpu"]) == 0  # both stages finished: skipped
    assert (pairs_dir / "metrics.jsonl").read_text() == before
    # only the mlm stage finished: it is reloaded (backbone and head) and stage 2 retrains bit-identically
    last = pairs_dir / "checkpoints" / "step-00000002" / "model.safetensors"
    first_run = load_file(str(last))
    shutil.rmtree(pairs_dir)
    shutil.rmtree(tmp_path / "run" / "final")
    assert main(["train", str(tmp_path / "two.yaml"), "--device", "cpu"]) == 0
    again = load_file(str(last))
    assert first_run.keys() == again.keys() and all(torch.equal(first_run[k], again[k]) for k in first_run)
    losses = [json.loads(x)["loss"] for x in (pairs_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == [r["loss"] for r in rows]


def test_old_mlm_recipe_files_load_with_a_warning(corpus, tmp_path):
    """A pre-0.2 MLM file (top-level ``objective: mlm``) reads as the same one-stage recipe, overrides
    written against its old layout included; the warning says how to update it."""
    old = {
        "objective": "mlm",
        "output_dir": str(tmp_path / "old"),
        "data_root": str(corpus),
        "seed": 3,
        "model": {"preset": "nomic-bert-2048", "overrides": TINY_MODEL, "tokenizer": str(corpus / "tokenizer")},
        "data": {
            "files": ["corpus.txt"],
            "format": "text",
            "chunk_len": 32,
            "heldout_fraction": 0.1,
            "mask_prob": 0.25,
        },
        "steps": 60,
        "batch_size": 16,
        "eval_batch_size": 8,
        "warmup_fraction": 0.1,
        "optim": {"lr": 3e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 1e-5},
        "precision": "fp32",
        "on_nonfinite": "skip",
        "log_every": 5,
        "eval_every": 20,
        "save_every": 10,
        "keep_last_checkpoints": 2,
    }
    (tmp_path / "old.yaml").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match=r"pre-0.2 layout .*`stages: \[\{name: mlm, objective: mlm"):
        converted, _ = load_recipe(tmp_path / "old.yaml", ["steps=7", "micro_batch_size=4"])
    changed = {"seed": 3, "steps": 7, "mlm.micro_batch_size": 4, "mlm.mask_prob": 0.25, "mlm.eval_batch_size": 8}
    changed.update(on_nonfinite="skip", save_every=10, keep_last_checkpoints=2)
    assert converted == recipe(corpus, tmp_path / "old", **changed)
    with pytest.raises(ConfigError, match="with a stages key: write --set overrides against the file's own layout"):
        load_recipe(tmp_path / "old.yaml", ["stages.0.steps=5"])
    (tmp_path / "old" / "checkpoints" / "step-00000010").mkdir(parents=True)  # a run begun before the change
    moved = r"old/checkpoints holds checkpoints of the pre-0.2 MLM layout; .*/old/01-mlm/checkpoints: move the folder"
    with pytest.raises(ConfigError, match=moved):
        load_recipe(tmp_path / "old.yaml")
    (tmp_path / "bad.yaml").write_text(json.dumps({**old, "output_dir": str(tmp_path / "bad"), "stepz": 3}))
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_recipe(tmp_path / "bad.yaml")


def test_shipped_mlm_recipes_load_and_train_at_tiny_size(corpus, tmp_path):
    assert [p.name for p in RECIPES] == ["cpu_mlm.yaml", "cpu_twin_mlm.yaml", "mlm.yaml"]
    for path in RECIPES:
        full, _ = load_recipe(path)
        stage = full.stages[0]
        assert stage.optim.betas == [0.9, 0.98] and stage.optim.eps == 1e-6 and stage.optim.weight_decay == 1e-5
        assert stage.mlm.mask_prob == 0.3 and stage.optim.warmup_fraction == 0.06
        out = tmp_path / path.stem
        overrides = [
            f"output_dir={out}",
            f"data_root={corpus}",
            "stages.0.mlm.files=[corpus.txt]",
            "stages.0.mlm.format=text",
            "stages.0.mlm.chunk_len=32",
            "stages.0.mlm.heldout_fraction=0.1",
            f"model.tokenizer={corpus / 'tokenizer'}",
            f"model.preset_overrides={json.dumps(TINY_MODEL)}",
            "stages.0.steps=2",
            "stages.0.mlm.batch_size=4",
            "stages.0.mlm.micro_batch_size=2",
            "stages.0.precision=fp32",
            "stages.0.log_every=1",
            "stages.0.eval_every=0",
        ]
        assert main(["train", str(path), "--device", "cpu", *[a for o in overrides for a in ("--set", o)]]) == 0
        assert (out / "final" / "config.json").is_file()
    full, _ = load_recipe(RECIPES[2])
    assert (full.stages[0].mlm.chunk_len, full.stages[0].mlm.batch_size, full.stages[0].optim.lr) == (2048, 4096, 5e-4)
    assert full.model.name_or_path == "nomic-bert-2048"
