"""The packaged all-MiniLM-L6-v2 against sentence-transformers."""

import numpy as np
import pytest

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def st_minilm(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embeddings_match_sentence_transformers(minilm, st_minilm, real_sentences):
    assert len(real_sentences) >= 200
    ours = minilm.encode(real_sentences, batch_size=32, precision="fp32")
    theirs = st_minilm.encode(real_sentences, batch_size=32, convert_to_numpy=True)
    assert _cosines(ours, theirs).min() >= 0.99999, _cosines(ours, theirs).min()


def test_default_precision_stays_within_1e_4_cosine_of_sentence_transformers(minilm, st_minilm, real_sentences):
    """The default path (``auto``: bf16 autocast on CPUs with native bf16, else fp32)."""
    from embforge.precision import cpu_has_native_bf16, resolve_precision

    native = cpu_has_native_bf16()
    assert resolve_precision(minilm.precision, "cpu") == ("bf16" if native else "fp32")
    ours = minilm.encode(real_sentences, batch_size=32)
    theirs = st_minilm.encode(real_sentences, batch_size=32, convert_to_numpy=True)
    cos = _cosines(ours, theirs)
    assert cos.min() >= 0.9999, cos.min()
    bf16 = minilm.encode(real_sentences[:32], precision="bf16")  # the bf16 path, wherever it runs
    assert _cosines(bf16, theirs[:32]).min() >= 0.9999
    assert not np.array_equal(bf16, minilm.encode(real_sentences[:32], precision="fp32"))  # autocast took effect


def test_saved_folder_loads_in_sentence_transformers(minilm, real_sentences, tmp_path):
    path = minilm.save(tmp_path / "minilm-copy")
    reloaded = st.SentenceTransformer(str(path), device="cpu")
    texts = real_sentences[:64]
    assert np.allclose(reloaded.encode(texts, convert_to_numpy=True), minilm.encode(texts, precision="fp32"), atol=1e-6)
    assert reloaded.max_seq_length == minilm.head.max_seq_len == 256


def test_matryoshka_truncation_of_real_model(minilm, real_sentences):
    full = minilm.encode(real_sentences[:20])
    small = minilm.encode(real_sentences[:20], dimensions=128)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert np.allclose(small, expected, atol=1e-5)
