"""Loading never replaces a trained head with a random one without being told to."""

import numpy as np
import pytest
import torch

from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec
from embforge.models.build import build_embedder
from embforge.models.embedder import Embedder
from embforge.models.spec import ModelConfig, PoolingConfig
from embforge.models.tiny import tiny_decoder

TEXTS = ["sort a list", "open the file and read data", "the cat runs fast"]
HEAD = {"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16, "mlp_ratio": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder holding a latent head whose weights differ from any fresh initialisation."""
    backbone, tokenizer = tiny_decoder("llama")
    model = Embedder(backbone, tokenizer, HeadSpec(pooling=HEAD))
    with torch.no_grad():
        for p in model.pooler.parameters():
            p.add_(torch.randn_like(p))  # "trained": no seed reproduces these
    folder = model.save(tmp_path_factory.mktemp("head") / "trained")
    return folder, model.encode(TEXTS, precision="fp32")


@pytest.mark.parametrize(
    "pooling",
    ["latent", {"name": "latent"}, {"name": "latent", "head_dim": None}, {"name": "latent", "head_dim": 16}, HEAD],
    ids=["name", "dict", "unset-head-dim", "one-size", "all-sizes"],
)
def test_a_request_compatible_with_the_trained_head_loads_it(trained, pooling):
    folder, expected = trained
    loaded = Embedder.load(folder, device="cpu", pooling=pooling)
    assert loaded.pooler.config() == Embedder.load(folder, device="cpu").pooler.config()
    np.testing.assert_array_equal(loaded.encode(TEXTS, precision="fp32"), expected)


def test_a_recipe_that_says_pooling_latent_trains_on_the_trained_head(trained):
    folder, expected = trained
    for pooling in ("latent", PoolingConfig(name="latent"), PoolingConfig(name="latent", num_latents=8, init="mean")):
        model = build_embedder(ModelConfig(name_or_path=str(folder), pooling=pooling))
        np.testing.assert_array_equal(model.encode(TEXTS, precision="fp32"), expected)


@pytest.mark.parametrize(
    ("pooling", "fields"),
    [
        ({"name": "latent", "head_dim": 32}, ["head_dim: the folder's 16, requested 32"]),
        (
            {"name": "latent", "num_latents": 4, "num_heads": 4},
            ["num_latents: the folder's 8, requested 4", "num_heads: the folder's 2, requested 4"],
        ),
        ("mean", ["name: the folder's 'latent', requested 'mean'"]),
        ("self_attention", ["name: the folder's 'latent', requested 'self_attention'"]),
    ],
)
def test_a_conflicting_request_is_an_error_naming_the_fields(trained, pooling, fields):
    folder, _ = trained
    with pytest.raises(ConfigError, match="holds a trained 'latent' head") as info:
        Embedder.load(folder, device="cpu", pooling=pooling)
    for field in fields:
        assert field in str(info.value)
    assert "new_head" in str(info.value)
    with pytest.raises(ConfigError, match="head_dim"):  # the recipe path says the same
        build_embedder(ModelConfig(name_or_path=str(folder), pooling=PoolingConfig(name="latent", head_dim=32)))
    with pytest.raises(ConfigError, match="holds a trained"):  # shapes only (FSDP ranks > 0, plans): the same rule
        Embedder.load(folder, device="meta", pooling=pooling)


def test_new_head_starts_a_fresh_head_when_asked(trained):
    folder, expected = trained
    fresh = Embedder.load(folder, device="cpu", pooling={"name": "latent", "head_dim": 32}, new_head=True)
    assert fresh.pooler.head_dim == 32
    spec = ModelConfig(name_or_path=str(folder), pooling=PoolingConfig(name="latent", init="mean"), new_head=True)
    as_mean = build_embedder(spec)
    assert not np.allclose(as_mean.encode(TEXTS, precision="fp32"), expected)
    # init "mean": the new head starts as exactly mean pooling of the same token states
    mean = Embedder.load(folder, device="cpu", pooling="mean", new_head=True)
    np.testing.assert_allclose(as_mean.encode(TEXTS, precision="fp32"), mean.encode(TEXTS, precision="fp32"), atol=1e-6)


def test_a_folder_without_a_trained_head_takes_the_requested_one(tmp_path):
    backbone, tokenizer = tiny_decoder("llama")
    folder = Embedder(backbone, tokenizer).save(tmp_path / "mean")  # parameter-free pooling: no head weights
    model = Embedder.load(folder, device="cpu", pooling={"name": "latent", "num_latents": 4, "head_dim": 8})
    assert model.pooler.config()["num_latents"] == 4
