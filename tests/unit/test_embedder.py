import json

import numpy as np
import pytest
import torch

from embforge.errors import ConfigError, InputError, ModelNotFoundError
from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder

TEXTS = ["sort a list", "open the file and read data", "the cat runs fast", "a", "find a match in the text string"]


def test_encode_shapes_norms_and_single_string(tiny_embedder):
    emb = tiny_embedder.encode(TEXTS)
    assert emb.shape == (5, 64) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    one = tiny_embedder.encode("sort a list")
    assert one.shape == (64,) and np.allclose(one, emb[0], atol=1e-6)


def test_batching_and_padding_do_not_change_embeddings(tiny_embedder):
    batched = tiny_embedder.encode(TEXTS, batch_size=5)
    singles = np.stack([tiny_embedder.encode([t], batch_size=1)[0] for t in TEXTS])
    assert np.allclose(batched, singles, atol=1e-5)


def test_encode_matches_differentiable_forward(tiny_embedder):
    batch = tiny_embedder.tokenize(TEXTS)
    with torch.no_grad():
        fwd = tiny_embedder(**batch).numpy()
    assert np.allclose(fwd, tiny_embedder.encode(TEXTS, precision="fp32"), atol=1e-5)


def test_matryoshka_dimensions_truncate_then_renormalise(tiny_embedder):
    full = tiny_embedder.encode(TEXTS)
    emb = tiny_embedder.encode(TEXTS, dimensions=16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert emb.shape == (5, 16) and np.allclose(emb, expected, atol=1e-5)
    for bad in (0, 65, 2.5, True):
        with pytest.raises(InputError, match="dimensions must be an integer"):
            tiny_embedder.encode(TEXTS, dimensions=bad)


def test_prompts(tiny_embedder):
    q = tiny_embedder.encode_queries(TEXTS)
    assert np.allclose(q, tiny_embedder.encode(["query: " + t for t in TEXTS]), atol=1e-5)
    d = tiny_embedder.encode_documents(TEXTS)
    assert not np.allclose(q, d)
    with pytest.raises(InputError, match=r"unknown prompt_name 'querry' \(did you mean 'query'\?\)"):
        tiny_embedder.encode(TEXTS, prompt_name="querry")


def test_bad_inputs(tiny_embedder):
    with pytest.raises(InputError, match=r"texts\[1\] must be a string"):
        tiny_embedder.encode(["ok", None])
    assert tiny_embedder.encode([]).shape == (0, 64)


def test_save_load_round_trip_and_atomic_replace(tiny_embedder, tmp_path):
    path = tiny_embedder.save(tmp_path / "m")
    files = {p.name for p in path.iterdir()}
    assert {"modules.json", "config.json", "model.safetensors", "sentence_bert_config.json", "1_Pooling"} <= files
    again = Embedder.load(path, device="cpu")
    assert again.head.prompts == tiny_embedder.head.prompts and again.head.max_seq_len == 64
    assert np.allclose(again.encode(TEXTS), tiny_embedder.encode(TEXTS), atol=1e-6)
    (path / "stale.txt").write_text("old")
    tiny_embedder.save(path)  # replaces the folder as a whole
    assert not (path / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind


def test_saved_folder_loads_in_sentence_transformers(tiny_model_dir, tiny_embedder):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_model_dir), device="cpu")
    ours = tiny_embedder.encode(TEXTS, precision="fp32")
    theirs = model.encode(TEXTS, convert_to_numpy=True)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert np.allclose(
        tiny_embedder.encode(TEXTS, prompt_name="query", precision="fp32"),
        model.encode(TEXTS, prompt_name="query"),
        atol=1e-5,
    )


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_other_poolings_round_trip(tiny_embedder, tmp_path, pooling):
    emb = Embedder(tiny_embedder.backbone, tiny_embedder.tokenizer, HeadSpec(pooling=pooling, max_seq_len=64))
    loaded = Embedder.load(emb.save(tmp_path / pooling), device="cpu")
    assert loaded.pooler.name == pooling
    assert np.allclose(loaded.encode(TEXTS), emb.encode(TEXTS), atol=1e-6)


def test_unknown_model_and_bad_folders(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'all-MiniLM-L6-v3'.*did you mean 'all-MiniLM-L6-v2'"):
        Embedder.load("all-MiniLM-L6-v3")
    with pytest.raises(ConfigError, match="not a model folder"):
        Embedder.load(tmp_path)


def test_unsupported_st_module_is_an_error(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    modules = json.loads((bad / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (bad / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="Dense.*not supported"):
        Embedder.load(bad)


def test_inference_precision_is_validated_and_selectable(tiny_embedder):
    from embforge.models.tiny import tiny_bert
    from embforge.precision import resolve_precision

    with pytest.raises(ConfigError, match="precision must be one of"):
        Embedder(*tiny_bert(), precision="fp16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        tiny_embedder.encode(TEXTS, precision="half")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    bf16, fp32 = tiny_embedder.encode(TEXTS, precision="bf16"), tiny_embedder.encode(TEXTS, precision="fp32")
    assert bf16.dtype == fp32.dtype == np.float32 and not np.array_equal(bf16, fp32)
    assert (bf16 * fp32).sum(1).min() > 0.999
    expected = bf16 if resolve_precision("auto", "cpu") == "bf16" else fp32
    np.testing.assert_array_equal(tiny_embedder.encode(TEXTS), expected)  # the default is `auto`


def test_cached_teacher_embeddings_are_keyed_by_the_resolved_precision(tiny_model_dir):
    from embforge.data.embedding_cache import cache_key

    keys = {
        p: cache_key(Embedder.load(tiny_model_dir, device="cpu", precision=p), TEXTS, None) for p in ("fp32", "bf16")
    }
    assert keys["fp32"] != keys["bf16"]
