"""Training at the precision recipes ship: ``dtype: bfloat16`` frozen weights, float32 masters for all that trains.

The NV-Embed recipes train a 7B decoder with LoRA and a latent head at ``dtype: bfloat16``.
Cast whole to bf16, the head had no float32 master: at LR 2e-5, AdamW's updates round away
(0 % of its LayerNorm entries changed in 50 steps), LoRA was merged in bf16 (small deltas
vanished) and stage 2 started from that lossy merge. These tests run the same settings on a
tiny decoder through ``embforge train``.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embforge.cli import main
from embforge.models.build import build_embedder
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_nv_embedder
from embforge.train.checkpoint import latest_checkpoint, load_model_weights
from embforge.train.recipe import load_recipe

from .helpers import crash_in_step, records

TEXTS = ["sort a list of data", "open the file", "the cat runs fast"]
INSTRUCTION = "find a file"
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny NV-style decoder with a latent head (randomly initialised, saved as a trained one)."""
    model = tiny_nv_embedder(instruction_template="instruct: {instruction}\nquery: ", max_seq_len=32)
    return model.save(tmp_path_factory.mktemp("bf16") / "start")


def write_recipe(folder, name_or_path, *, steps=20, merge_on_save=False, save_every=0) -> str:
    data = folder / "pairs.jsonl"
    if not data.exists():
        rows = [{"query": r.query, "positive": r.positive, "negatives": r.negatives} for r in records(60, 1, seed=5)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {
            "name_or_path": str(name_or_path),
            "pooling": "latent",  # sizes unset: the folder's trained head loads
            "lora": {**LORA, "merge_on_save": merge_on_save},
            "dtype": "bfloat16",
        },
        "output_dir": str(folder / "run"),
        "data_root": str(folder),
        "seed": 0,
        "stages": [
            {
                "name": "retrieval",
                "steps": steps,
                "precision": "bf16",
                "log_every": 5,
                "save_every": save_every,
                "data": {
                    "batch_size": 4,
                    "num_negatives": 1,
                    "datasets": [{"name": "pairs", "path": "pairs.jsonl", "instruction": INSTRUCTION}],
                },
                "loss": {"temperature": 0.05},
                "optim": {"lr": 2.0e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
            }
        ],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def built(recipe_path) -> Embedder:
    recipe, _ = load_recipe(recipe_path)
    torch.manual_seed(recipe.seed)  # as run_recipe seeds before building: the same LoRA initialisation
    return build_embedder(recipe.model)


def test_bf16_recipe_trains_every_trainable_tensor_and_keeps_float32_masters(start, tmp_path):
    recipe = write_recipe(tmp_path, start)
    before = built(recipe)
    dtypes = {p.dtype for p in before.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}  # the frozen base is bf16, as the recipe asks
    initial = trainable(before)
    assert initial and all(t.dtype == torch.float32 for t in initial.values())
    assert any(n.startswith("pooler.") for n in initial) and any("lora_" in n for n in initial)

    assert main(["train", recipe]) == 0
    end = load_file(str(latest_checkpoint(tmp_path / "run" / "01-retrieval" / "checkpoints") / "model.safetensors"))
    assert set(end) == set(initial)
    for name, value in initial.items():
        assert end[name].dtype == torch.float32, name
        changed = (end[name] != value).float().mean().item()
        assert changed >= 0.95, f"{name}: {changed:.1%} of its entries changed in 20 steps"


def test_lora_merges_in_float32_then_casts_once_and_stage_two_starts_where_stage_one_ended(start, tmp_path):
    recipe = write_recipe(tmp_path, start, merge_on_save=False)
    assert main(["train", recipe]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "adapter").is_dir()  # the adapter is kept apart (float32): nothing is rounded at the handoff

    # stage 1's end: its build with the last checkpoint's trained tensors
    end = built(recipe)
    load_model_weights(latest_checkpoint(tmp_path / "run" / "01-retrieval" / "checkpoints"), end)
    # stage 2 starts from the saved folder, as recipes/nv_embed/stage2.yaml does
    (tmp_path / "two").mkdir()
    second = built(write_recipe(tmp_path / "two", final))
    assert trainable(second).keys() == trainable(end).keys()
    for (name, a), (_, b) in zip(end.state_dict().items(), second.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # every tensor, frozen bf16 base included
    kwargs = {"prompt": end.head.instruction_prompt(INSTRUCTION), "precision": "fp32"}
    assert (end.encode(TEXTS, **kwargs) == second.encode(TEXTS, **kwargs)).all()

    # merged: float32 sum of the bf16 base and the float32 delta, then one cast to the saved dtype
    base = end.backbone.get_base_model()
    for dtype in ("float32", "bfloat16"):
        folder = end.save(tmp_path / f"merged-{dtype}", merge_lora=True, dtype=dtype)
        saved = load_file(str(folder / "model.safetensors"))
        checked = 0
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                expected = module.base_layer.weight.float() + module.get_delta_weight("default").float()
                assert torch.equal(saved[f"backbone.{name}.weight"], expected.to(getattr(torch, dtype))), name
                checked += 1
        assert checked == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
        assert all(t.dtype == getattr(torch, dtype) for t in saved.values())
    # at float32 compute the merged folder embeds as the adapter folder does (loads run in float32)
    merged, unmerged = (Embedder.load(f, device="cpu") for f in (tmp_path / "merged-float32", final))
    assert (merged.encode(TEXTS, **kwargs) * unmerged.encode(TEXTS, **kwargs)).sum(1).min() >= 0.999999


def test_bf16_recipe_resumes_the_uninterrupted_trajectory(start, tmp_path):
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = write_recipe(tmp_path / "straight", start, steps=12, save_every=4)
    assert main(["train", straight]) == 0
    resumed = write_recipe(tmp_path / "resumed", start, steps=12, save_every=4)
    with crash_in_step(7), pytest.raises(KeyboardInterrupt):
        main(["train", resumed])
    assert main(["train", resumed]) == 0  # from step 4's checkpoint
    a, b = (
        load_file(str(latest_checkpoint(d / "run" / "01-retrieval" / "checkpoints") / "model.safetensors"))
        for d in (tmp_path / "straight", tmp_path / "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapter_folder_builds_on_meta_with_the_structure_it_loads_with(start, tmp_path):
    """FSDP ranks other than 0 build stage 2 on meta from stage 1's adapter folder."""
    assert main(["train", write_recipe(tmp_path, start, steps=2)]) == 0
    final = tmp_path / "run" / "final"
    real, meta = (Embedder.load(final, device=d) for d in ("cpu", "meta"))
    shapes = {n: (p.shape, p.requires_grad) for n, p in real.named_parameters()}
    assert shapes == {n: (p.shape, p.requires_grad) for n, p in meta.named_parameters()}
    assert all(p.is_meta for p in meta.parameters()) and any("lora_" in n for n in shapes)
