"""The packaged all-MiniLM-L6-v2 against sentence-transformers."""

import numpy as np
import pytest

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def st_minilm(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def test_embeddings_match_sentence_transformers(minilm, st_minilm, real_sentences):
    assert len(real_sentences) >= 200
    ours = minilm.encode(real_sentences, batch_size=32)
    theirs = st_minilm.encode(real_sentences, batch_size=32, convert_to_numpy=True)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, cos.min()


def test_saved_folder_loads_in_sentence_transformers(minilm, real_sentences, tmp_path):
    path = minilm.save(tmp_path / "minilm-copy")
    reloaded = st.SentenceTransformer(str(path), device="cpu")
    texts = real_sentences[:64]
    assert np.allclose(reloaded.encode(texts, convert_to_numpy=True), minilm.encode(texts), atol=1e-6)
    assert reloaded.max_seq_length == minilm.max_seq_len == 256


def test_matryoshka_truncation_of_real_model(minilm, real_sentences):
    full = minilm.encode(real_sentences[:20])
    small = minilm.encode(real_sentences[:20], dimensions=128)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert np.allclose(small, expected, atol=1e-5)
