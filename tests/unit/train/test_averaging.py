"""Averaging the last k checkpoints of a LoRA + latent-head run at the precision recipes ship (bf16 base)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from embforge.cli import main
from embforge.errors import ConfigError
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_nv_embedder
from embforge.train.averaging import average_checkpoints

from .test_bf16_training import LORA, TEXTS, write_recipe

MODULE = "layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps, a checkpoint every 2: step-2, step-4, step-6."""
    folder = tmp_path_factory.mktemp("average")
    start = tiny_nv_embedder(instruction_template="instruct: {instruction}\nquery: ", max_seq_len=32).save(
        folder / "start"
    )
    assert main(["train", write_recipe(folder, start, steps=6, save_every=2)]) == 0
    return folder, folder / "run" / "01-retrieval"


def effective(start: dict, checkpoint, module: str) -> torch.Tensor:
    """W + B·A·α/r of one LoRA module, by hand from the base (cast to bf16, as the recipe loads it)."""
    ckpt = load_file(str(checkpoint / "model.safetensors"))
    a = ckpt[f"backbone.base_model.model.{module}.lora_A.default.weight"].double()
    b = ckpt[f"backbone.base_model.model.{module}.lora_B.default.weight"].double()
    base = start[f"backbone.{module}.weight"].to(torch.bfloat16).double()
    return base + b @ a * LORA["alpha"] / LORA["r"]


def test_the_average_of_the_last_k_is_the_mean_of_their_effective_weights(run, tmp_path):
    folder, stage = run
    out = average_checkpoints(stage, tmp_path / "avg", last=2, dtype="float32", show_progress=False)
    merged = load_file(str(out / "model.safetensors"))
    start = load_file(str(folder / "start" / "model.safetensors"))
    ck = sorted((stage / "checkpoints").iterdir())[-2:]
    assert [c.name for c in ck] == ["step-00000004", "step-00000006"]
    expected = (effective(start, ck[0], MODULE) + effective(start, ck[1], MODULE)) / 2
    torch.testing.assert_close(merged[f"backbone.{MODULE}.weight"].double(), expected, atol=1e-6, rtol=0)
    heads = [load_file(str(c / "model.safetensors")) for c in ck]
    for name in (n for n in heads[0] if n.startswith("pooler.")):  # the head trains fully: a plain mean
        torch.testing.assert_close(merged[name].double(), (heads[0][name].double() + heads[1][name].double()) / 2)
    record = json.loads((out / "merge.json").read_text())
    assert record["averaged_checkpoints"] == 2 and record["models"] == [str(c) for c in ck]
    # the result is a model like any: it loads and embeds between the two checkpoints
    loaded = Embedder.load(out)
    assert loaded.encode(TEXTS).shape[0] == len(TEXTS)


def test_the_last_checkpoint_alone_is_the_stage_end_and_the_cli_writes_it(run, tmp_path):
    folder, stage = run
    assert main(["merge", "--checkpoints", str(stage), "--last", "1", "--output", str(tmp_path / "one")]) == 0
    one = Embedder.load(tmp_path / "one")
    end = Embedder.load(folder / "run" / "final")  # the run's own save: adapter kept apart (merge_on_save false)
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(one.encode(TEXTS)), torch.as_tensor(end.encode(TEXTS)))
    assert float(cos.min()) > 0.9999


def test_too_few_checkpoints_and_wrong_folders_are_named(run, tmp_path):
    _, stage = run
    with pytest.raises(ConfigError, match="4 checkpoints asked for, 3 intact"):
        average_checkpoints(stage, tmp_path / "x", last=4)
    with pytest.raises(ConfigError, match="no checkpoints"):
        average_checkpoints(tmp_path, tmp_path / "x", last=1)
    with pytest.raises(SystemExit):
        main(["merge", "a", "--checkpoints", str(stage), "--output", str(tmp_path / "x")])
