"""The Matryoshka inference rule a model's folder names, and sentence-transformers' truncate_dim agreeing with it."""

import json

import numpy as np
import pytest
import torch

from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_bert

TEXTS = ["sort a list of python dict values by key", "the cat runs fast", "open the file and read data", "red"]


def tiny(rule: str, **kwargs) -> Embedder:
    backbone, tokenizer = tiny_bert(seed=3)
    with torch.no_grad():  # a trained-looking final LayerNorm: pooled vectors off-centre, so the rule matters
        backbone.encoder.layer[-1].output.LayerNorm.bias.normal_(0.5, 1.0, generator=torch.Generator().manual_seed(0))
    return Embedder(backbone, tokenizer, HeadSpec(max_seq_len=32, matryoshka_rule=rule, **kwargs)).eval()


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pooled(model: Embedder) -> np.ndarray:
    """The mean-pooled vectors before any rule or normalisation."""
    raw = tiny("truncate", normalize=False)
    raw.backbone.load_state_dict(model.backbone.state_dict())
    return raw.encode(TEXTS)


@pytest.mark.parametrize("dim", [None, 48, 16])
def test_layer_norm_rule_is_norm_then_truncate_then_l2(dim):
    model = tiny("layer_norm")
    x = pooled(model)
    normed = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)  # non-affine layer norm
    expected = l2(normed[:, :dim])
    np.testing.assert_allclose(model.encode(TEXTS, dimensions=dim), expected, atol=1e-5)
    plain = tiny("truncate")
    np.testing.assert_allclose(plain.encode(TEXTS, dimensions=dim), l2(x[:, :dim]), atol=1e-5)
    assert not np.allclose(model.encode(TEXTS, dimensions=dim), plain.encode(TEXTS, dimensions=dim), atol=1e-3)


def test_forward_applies_the_rule_too():
    model = tiny("layer_norm")
    with torch.no_grad():
        trained = model(**model.tokenize(TEXTS)).numpy()
    np.testing.assert_allclose(trained, model.encode(TEXTS, precision="fp32"), atol=1e-5)


@pytest.mark.parametrize("rule", ["truncate", "layer_norm"])
def test_sentence_transformers_folder_states_the_rule_and_truncate_dim_agrees(rule, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model = tiny(rule)
    folder = model.save(tmp_path / rule)
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == (["Transformer", "Pooling", "LayerNorm", "Normalize"] if rule == "layer_norm" else
                       ["Transformer", "Pooling", "Normalize"])  # fmt: skip
    again = Embedder.load(folder, device="cpu")
    assert again.head.matryoshka_rule == rule
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    for dim in (None, 48, 16):
        ours = model.encode(TEXTS, dimensions=dim, precision="fp32")
        np.testing.assert_allclose(again.encode(TEXTS, dimensions=dim, precision="fp32"), ours, atol=1e-6)
        np.testing.assert_allclose(theirs.encode(TEXTS, truncate_dim=dim, normalize_embeddings=True), ours, atol=1e-5)


def test_embforge_folder_carries_the_rule_into_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model = tiny("layer_norm", pooling={"name": "latent", "num_latents": 4, "num_heads": 2, "head_dim": 16})
    folder = model.save(tmp_path / "latent")
    assert json.loads((folder / "config.json").read_text())["head"]["matryoshka_rule"] == "layer_norm"
    assert Embedder.load(folder, device="cpu").head.matryoshka_rule == "layer_norm"
    theirs = st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    for dim in (None, 16):
        ours = model.encode(TEXTS, dimensions=dim, precision="fp32")
        np.testing.assert_allclose(theirs.encode(TEXTS, truncate_dim=dim, normalize_embeddings=True), ours, atol=1e-5)


def test_unknown_rule_and_affine_layer_norm_are_refused(tmp_path):
    with pytest.raises(ValueError, match="matryoshka_rule must be one of"):
        tiny("layernorm")
    folder = tiny("layer_norm").save(tmp_path / "m")
    from safetensors.numpy import save_file

    save_file(
        {"norm.weight": np.full(64, 2.0, np.float32), "norm.bias": np.zeros(64, np.float32)},
        str(folder / "2_LayerNorm" / "model.safetensors"),
    )
    with pytest.raises(ConfigError, match="only a non-affine LayerNorm"):
        Embedder.load(folder, device="cpu")
