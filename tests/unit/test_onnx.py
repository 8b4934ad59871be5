"""ONNX export of the whole Embedder and the ONNX Runtime embedder (tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from embforge.errors import ConfigError, InputError  # noqa: E402
from embforge.onnx.export import export_onnx  # noqa: E402
from embforge.onnx.runtime import OnnxEmbedder, is_onnx_folder  # noqa: E402
from embforge.serve.backend import OnnxBackend  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tiny_embedder, tmp_path_factory):
    return export_onnx(tiny_embedder, tmp_path_factory.mktemp("onnx") / "tiny", quantize=True, source="tiny")


TEXTS = ["sort a list", "the cat runs fast", "read the file " * 30, "x"]


def test_export_reproduces_embedder_encode(tiny_embedder, onnx_dir):
    assert is_onnx_folder(onnx_dir) and not is_onnx_folder(onnx_dir.parent)
    onnx = OnnxEmbedder.load(onnx_dir)
    assert (onnx.hidden_size, onnx.head.max_seq_len, onnx.head.prompts) == (64, 64, tiny_embedder.head.prompts)
    for kwargs in ({}, {"prompt_name": "query"}, {"dimensions": 16}, {"batch_size": 1}):
        np.testing.assert_allclose(
            onnx.encode(TEXTS, **kwargs), tiny_embedder.encode(TEXTS, **kwargs, precision="fp32"), atol=1e-5
        )
    np.testing.assert_allclose(
        onnx.encode_queries("sort a list"), tiny_embedder.encode_queries("sort a list", precision="fp32"), atol=1e-5
    )
    # the same token ids as the model's own tokenizer, truncation included
    assert onnx.tokenize(TEXTS)["input_ids"].tolist() == tiny_embedder.tokenize(TEXTS)["input_ids"].tolist()


def test_int8_model_is_close(tiny_embedder, onnx_dir):
    int8 = OnnxEmbedder(onnx_dir, quantized=True).encode(TEXTS)
    ref = tiny_embedder.encode(TEXTS)
    assert int8.shape == ref.shape
    assert (int8 * ref).sum(1).min() > 0.95
    assert not np.array_equal(int8, OnnxEmbedder(onnx_dir).encode(TEXTS))  # really another model


def test_onnx_backend_counts_full_lengths(onnx_dir):
    backend = OnnxBackend(OnnxEmbedder(onnx_dir), "tiny")
    items = backend.tokenize(TEXTS, None)
    assert items[2].num_tokens == 64 < items[2].input_tokens
    got = backend.embed([i.features for i in items])
    np.testing.assert_allclose(got, OnnxEmbedder(onnx_dir).encode(TEXTS), atol=1e-5)


def test_bad_folders_and_inputs(onnx_dir, tmp_path):
    with pytest.raises(ConfigError, match="not an ONNX export"):
        OnnxEmbedder(tmp_path)
    (tmp_path / "embforge_onnx.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ConfigError, match="format_version"):
        OnnxEmbedder(tmp_path)
    onnx = OnnxEmbedder(onnx_dir)
    with pytest.raises(InputError, match="unknown prompt_name 'qurey'"):
        onnx.encode(["x"], prompt_name="qurey")
    with pytest.raises(InputError, match="dimensions"):
        onnx.encode(["x"], dimensions=65)
    with pytest.raises(InputError, match=r"texts\[1\]"):
        onnx.encode(["x", 3])


def test_cli_export_then_encode_without_torch_path(tiny_model_dir, tmp_path):
    from embforge.cli import main

    out = tmp_path / "exported"
    assert main(["export", "onnx", str(tiny_model_dir), str(out), "--int8"]) == 0
    inp = tmp_path / "in.txt"
    inp.write_text("sort a list\nread the file\n")
    for flags in ([], ["--int8"]):
        assert main(["encode", str(out), "--input", str(inp), "--output", str(tmp_path / "e.npy"), *flags]) == 0
        assert np.load(tmp_path / "e.npy").shape == (2, 64)
    assert (
        main(["encode", str(tiny_model_dir), "--int8", "--input", str(inp), "--output", str(tmp_path / "e.npy")]) == 2
    )
    assert main(["export", "onnx", str(tiny_model_dir), str(tmp_path / "no"), "--int8-ffn-down"]) == 2  # needs --int8
    assert not (tmp_path / "no").exists()
    # --precision is for PyTorch models: refused for an ONNX folder, not silently ignored
    assert (
        main(["encode", str(out), "--precision", "bf16", "--input", str(inp), "--output", str(tmp_path / "f.npy")]) == 2
    )
    assert not (tmp_path / "f.npy").exists()


def _op_counts(path) -> dict[str, int]:
    import collections

    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_int8_keeps_the_ffn_down_projection_fp32_unless_told_to_quantise_it(tiny_embedder, onnx_dir, tmp_path):
    # the padded forward is exported: the packed path's gathers and scatters made ONNX Runtime slow
    assert not {"ScatterElements", "ScatterND", "NonZero"} & set(_op_counts(onnx_dir / "model.onnx"))
    layers = tiny_embedder.backbone.config.num_hidden_layers

    def int8_matmuls(folder) -> int:
        ops = _op_counts(folder / "model_int8.onnx")
        return ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"]  # the latter shares a quantised input

    assert int8_matmuls(onnx_dir) == 5 * layers  # q, k, v, attention out, FFN up; FFN down stays fp32
    every = export_onnx(tiny_embedder, tmp_path / "ffn", quantize=True, quantize_ffn_down=True)
    assert int8_matmuls(every) == 6 * layers
    ref = tiny_embedder.encode(TEXTS, precision="fp32")
    for folder in (onnx_dir, every):
        int8 = OnnxEmbedder(folder, quantized=True).encode(TEXTS)
        assert (int8 * ref).sum(1).min() > 0.95


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_batch_cut_into_chunks_for_several_cores_gives_the_whole_batch_s_embeddings(tiny_embedder, onnx_dir, runtime):
    """Each core runs its own chunk of rows (a single-threaded runner each); 1, 2 and 3 runners
    give the embeddings `Embedder.encode` gives, with prompts, truncation and every length mixed."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    texts = TEXTS + ["a", "a longer sentence about sorting lists of numbers", "read " * 5]
    expected = tiny_embedder.encode(texts, prompt_name="query", precision="fp32")
    for threads in (1, 2, 3):
        onnx = OnnxEmbedder(onnx_dir, num_threads=threads, runtime=runtime)
        for batch_size in (len(texts), 2, 1):
            got = onnx.encode(texts, prompt_name="query", batch_size=batch_size)
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{threads} runners, batch {batch_size}")
        onnx.encode(texts, prompt_name="query", batch_size=len(texts))  # one batch of every length
        calls = onnx._runner.calls  # (rows, width) of each runner call of that batch
        assert len(calls) == threads and sum(rows for rows, _ in calls) == len(texts), calls
        if threads > 1:  # the chunk of the shortest rows leaves out the padding it does not need
            assert calls[-1][1] < calls[0][1] == onnx.tokenize(texts, prompt_name="query")["input_ids"].shape[1]
    whole = OnnxEmbedder(onnx_dir, num_threads=2, runtime=runtime, chunked=False)
    np.testing.assert_allclose(whole.encode(texts, prompt_name="query"), expected, atol=1e-5)
    assert len(whole._runner.calls) == 1
    # a batch of fewer rows than runners: one call on a runner using every core
    single = OnnxEmbedder(onnx_dir, num_threads=3, runtime=runtime)
    np.testing.assert_allclose(single.encode(texts[:2], prompt_name="query"), expected[:2], atol=1e-5)
    assert len(single._runner.calls) == 1


@pytest.fixture(scope="module")
def openvino_dir(tiny_embedder, tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    sample = [f"{w} number {i} in a list of things to sort" for i, w in enumerate(["sort", "read", "cat"] * 20)]
    folder = tmp_path_factory.mktemp("openvino") / "tiny"
    return export_onnx(tiny_embedder, folder, quantize=True, openvino=True, calibration_texts=sample, source="tiny")


def test_openvino_runs_the_folder_at_fp32_and_its_own_int8_model(tiny_embedder, openvino_dir):
    ov = OnnxEmbedder(openvino_dir, runtime="openvino")
    for kwargs in ({}, {"prompt_name": "query"}, {"dimensions": 16}):
        np.testing.assert_allclose(
            ov.encode(TEXTS, **kwargs), tiny_embedder.encode(TEXTS, **kwargs, precision="fp32"), atol=1e-5
        )
    int8 = OnnxEmbedder(openvino_dir, runtime="openvino", quantized=True).encode(TEXTS)
    ref = tiny_embedder.encode(TEXTS, precision="fp32")
    assert (int8 * ref).sum(1).min() > 0.95
    assert np.abs(int8 - ref).max() > 1e-4  # really the quantised model
    assert _op_counts(openvino_dir / "model_int8.onnx")  # the ONNX Runtime int8 model is written too
    with pytest.raises(ConfigError, match="runtime 'tensorrt'"):
        OnnxEmbedder(openvino_dir, runtime="tensorrt")
    with pytest.raises(ConfigError, match=r"openvino_int8.xml: missing \(export with --int8 --openvino\)"):
        OnnxEmbedder(_without_openvino(openvino_dir), runtime="openvino", quantized=True)


def _without_openvino(folder):
    import shutil

    copy = folder.parent / "copy-without-openvino"
    if not copy.exists():
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("openvino_int8.*"))
    return copy


def test_cli_exports_for_openvino_and_encodes_with_it(tiny_model_dir, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from embforge.cli import main

    sample = tmp_path / "sample.txt"
    sample.write_text("".join(f"passage {i} about sorting a list\n" for i in range(40)))
    out = tmp_path / "exported"
    assert main(["export", "onnx", str(tiny_model_dir), str(out), "--int8", "--openvino",
                 "--calibration-input", str(sample)]) == 0  # fmt: skip
    assert (out / "openvino_int8.xml").is_file() and (out / "openvino_int8.bin").is_file()
    emb = {}
    for flags in ([], ["--int8"]):
        dst = tmp_path / f"e{len(flags)}.npy"
        args = ["encode", str(out), "--input", str(sample), "--output", str(dst), "--runtime", "openvino", *flags]
        assert main(args) == 0
        emb[len(flags)] = np.load(dst)
    assert emb[0].shape == emb[1].shape == (40, 64) and not np.array_equal(emb[0], emb[1])
    # refused, nothing written: --openvino without --int8, --calibration-input without --openvino,
    # --runtime on a PyTorch model
    assert main(["export", "onnx", str(tiny_model_dir), str(tmp_path / "no"), "--openvino"]) == 2
    args = ["export", "onnx", str(tiny_model_dir), str(tmp_path / "no"), "--int8", "--calibration-input", str(sample)]
    assert main(args) == 2
    assert not (tmp_path / "no").exists()
    args = [
        "encode",
        str(tiny_model_dir),
        "--runtime",
        "openvino",
        "--input",
        str(sample),
        "--output",
        str(tmp_path / "f.npy"),
    ]
    assert main(args) == 2 and not (tmp_path / "f.npy").exists()
