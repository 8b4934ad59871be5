"""The parity contract (bench/parity.py --quick): every path out of every kind of model gives the same embedding.

One test per model; each checks every path (Embedder.encode, sentence-transformers, the
README's plain-transformers snippet without embforge, ONNX fp32 and int8, the server in
float and base64 under 8 concurrent clients) against the bounds of bench/parity.py.
"""

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")


@pytest.mark.parametrize(
    "model", ["minilm", "minilm-instruction", "nomic-ntk", "nv-decoder", "last-token", "nv-adapter"]
)
def test_every_path_gives_the_embedder_s_embedding(load_bench, model, minilm_dir, tmp_path):
    parity = load_bench("parity")
    (case,) = parity.build_cases(tmp_path, quick=True, only=[model])
    cells = parity.run_case(case, tmp_path, list(parity.PATHS))
    assert set(cells) == set(parity.PATHS)
    failed = {path: c for path, c in cells.items() if not c["ok"]}
    assert not failed, f"{model}: {failed}"
