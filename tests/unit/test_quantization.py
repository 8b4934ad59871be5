"""Output-embedding quantisation and rescored search (numpy, seeded synthetic embeddings)."""

import numpy as np
import pytest

from embforge.errors import InputError
from embforge.quantization import (
    calibration_ranges,
    dequantize_embeddings,
    quantize_embeddings,
    search,
)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 384))
    corpus = _unit(centers[rng.integers(0, 40, 2000)] + rng.standard_normal((2000, 384)))  # topical clusters
    queries = _unit(corpus[:200] + 0.6 * rng.standard_normal((200, 384)) / 20)  # near their own document
    return corpus, queries


def test_int8_round_trip_within_half_a_step(data):
    corpus, _ = data
    ranges = calibration_ranges(corpus)
    for precision in ("int8", "uint8"):
        q = quantize_embeddings(corpus, precision, ranges)
        assert q.dtype == np.dtype(precision) and q.shape == corpus.shape
        back = dequantize_embeddings(q, precision, ranges)
        step = (ranges[1] - ranges[0]) / 255
        assert np.all(np.abs(back - corpus) <= step / 2 + 1e-6)
    # values outside the calibration range are clipped, not wrapped
    wide = quantize_embeddings(corpus * 3, "int8", ranges)
    assert wide.min() == -128 and wide.max() == 127


def test_binary_packs_signs(data):
    corpus, _ = data
    b = quantize_embeddings(corpus, "binary")
    u = quantize_embeddings(corpus, "ubinary")
    assert b.shape == u.shape == (2000, 48) and b.dtype == np.int8 and u.dtype == np.uint8
    np.testing.assert_array_equal(b.astype(np.int16) + 128, u)
    np.testing.assert_array_equal(dequantize_embeddings(u, "ubinary", dim=384), np.where(corpus > 0, 1.0, -1.0))
    np.testing.assert_array_equal(dequantize_embeddings(b, "binary", dim=384), np.where(corpus > 0, 1.0, -1.0))


def _score_ratio(queries, corpus, indices):
    """Float similarity of what was retrieved / that of the exact float top-k (1.0 = as good as float)."""
    sims = queries @ corpus.T  # (Q, N)
    best = -np.sort(-sims, axis=1)[:, : indices.shape[1]]
    return np.take_along_axis(sims, indices, axis=1).sum() / best.sum()


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_rescored_search_recovers_the_float_ranking(data, precision):
    corpus, queries = data
    ranges = calibration_ranges(corpus[:500])  # calibrated on a sample, as in practice
    q = quantize_embeddings(corpus, precision, ranges)
    scores, idx = search(queries, q, precision, top_k=10, ranges=ranges, rescore_multiplier=4)
    assert idx.shape == scores.shape == (200, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert np.mean(idx[:, 0] == np.arange(200)) >= 0.98  # each query finds its own document
    ratio = _score_ratio(queries, corpus, idx)
    assert ratio >= (0.99 if precision in ("int8", "uint8") else 0.9), ratio
    if precision in ("binary", "ubinary"):  # rescoring more candidates helps
        _, plain = search(queries, q, precision, top_k=10, rescore_multiplier=1)
        assert ratio > _score_ratio(queries, corpus, plain)


def test_bad_arguments():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(InputError, match="unknown precision"):
        quantize_embeddings(x, "int4")
    with pytest.raises(InputError, match=r"shape \(2, 4\)"):
        quantize_embeddings(x, "int8", np.zeros((2, 5)))
    with pytest.raises(InputError, match="calibration ranges"):
        search(x, quantize_embeddings(x, "int8"), "int8")
    with pytest.raises(InputError, match="non-empty"):
        calibration_ranges(np.zeros((0, 4)))


def test_hamming_distances_and_search_match_a_naive_count(data):
    from embforge.quantization import hamming_distances, hamming_search

    corpus, queries = data
    for dim in (384, 60):  # whole 64-bit words, and a ragged tail of bits
        cq = quantize_embeddings(corpus[:300, :dim], "ubinary")
        qq = quantize_embeddings(queries[:20, :dim], "ubinary")
        naive = (np.sign(queries[:20, None, :dim]) != np.sign(corpus[None, :300, :dim])).sum(-1)  # no exact zeros
        np.testing.assert_array_equal(hamming_distances(qq, cq), naive)
        dist, idx = hamming_search(qq, cq, top_k=5, query_chunk=7)
        np.testing.assert_array_equal(dist, np.sort(naive, axis=1)[:, :5])
        np.testing.assert_array_equal(np.take_along_axis(naive, idx, axis=1), dist)
    # each query's own document (it is a small perturbation of it) is its nearest code
    _, idx = hamming_search(quantize_embeddings(queries, "ubinary"), quantize_embeddings(corpus, "ubinary"), top_k=1)
    assert (idx[:, 0] == np.arange(len(queries))).mean() > 0.95
    with pytest.raises(InputError, match="ubinary"):
        hamming_distances(quantize_embeddings(queries[:2], "binary"), quantize_embeddings(corpus[:3], "binary"))


def test_calibration_files_round_trip_and_bad_ones_name_the_file(tmp_path, data):
    from embforge.quantization import Calibration, calibrate

    corpus, _ = data
    cal = calibrate(corpus, [384, 128], normalize=True, prompt_name="document")
    again = Calibration.load(cal.save(tmp_path / "c.json"))
    assert sorted(again.ranges) == [128, 384] and again.prompt_name == "document" and again.sample_size == 2000
    np.testing.assert_array_equal(again.ranges[128], cal.ranges[128])
    # each width's ranges are those of the truncated, re-normalised embeddings
    short = corpus[:, :128] / np.linalg.norm(corpus[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(cal.ranges[128], calibration_ranges(short), atol=1e-6)
    with pytest.raises(InputError, match="no int8/uint8 calibration for 64 dimensions"):
        cal.ranges_for(64)
    assert Calibration.find(tmp_path) is None
    (tmp_path / "calibration.json").write_text('{"format": 1, "sample_size": 3, "ranges": {"4": [[0, 0], [1, 1]]}}')
    with pytest.raises(InputError, match=r"calibration.json: not a calibration file \(ranges\['4'\]"):
        Calibration.find(tmp_path)
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(InputError, match="calibration.json: not a calibration file"):
        Calibration.load(tmp_path)
    with pytest.raises(InputError, match="no calibration file"):
        Calibration.load(tmp_path / "missing.json")
