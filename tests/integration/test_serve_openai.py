"""The official `openai` client against a live `embforge serve` of the packaged MiniLM on 127.0.0.1."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from embforge.serve.launch import start_server, stop_server  # noqa: E402

KEY = "test-key"
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def onnx_minilm(minilm, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from embforge.onnx.export import export_onnx

    return export_onnx(minilm, tmp_path_factory.mktemp("onnx") / "minilm", source=MODEL)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def server(request, minilm_dir):
    # fp32 on both backends, so answers equal `Embedder.encode(precision="fp32")` to float rounding;
    # the default (auto) precision is tested on its own below
    torch = request.param == "torch"
    model = MODEL if torch else str(request.getfixturevalue("onnx_minilm"))
    proc, url = start_server(
        model,
        "--served-model-name", MODEL, "--api-key", KEY, "--max-items", "64", "--max-queued-items", "128",
        "--max-body-bytes", "300000", *(["--precision", "fp32"] if torch else []),
    )  # fmt: skip
    yield url
    assert stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


TEXTS = [
    "How do I sort a list in Python?",
    "The cat sat on the mat.",
    "Gradient descent minimises a loss function by following its negative gradient step by step.",
    "ok",
]


@pytest.mark.parametrize("dimensions", [None, 128])
@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_embedder_embeddings(client, minilm, encoding_format, dimensions):
    kwargs = {"dimensions": dimensions} if dimensions else {}
    resp = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format=encoding_format, **kwargs)
    got = []
    for d in resp.data:  # the client decodes base64 itself only when it chose the format
        e = d.embedding
        got.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e))
    expected = minilm.encode(TEXTS, dimensions=dimensions, precision="fp32")
    np.testing.assert_allclose(np.stack(got), expected, atol=2e-5)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    n_tokens = sum(len(ids) for ids in minilm.tokenizer(TEXTS)["input_ids"])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == n_tokens


def test_default_client_format_single_string_and_token_ids(client, minilm):
    resp = client.embeddings.create(input=TEXTS[0], model=MODEL)  # the client asks for base64 by default
    np.testing.assert_allclose(resp.data[0].embedding, minilm.encode(TEXTS[0], precision="fp32"), atol=2e-5)
    ids = minilm.tokenizer(TEXTS[:2])["input_ids"]
    resp = client.embeddings.create(input=ids, model=MODEL, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in resp.data], minilm.encode(TEXTS[:2], precision="fp32"), atol=2e-5)


def test_default_precision_server_stays_within_1e_4_cosine_of_fp32(minilm):
    """No --precision: auto (bf16 autocast on CPUs with native bf16, else fp32), like `Embedder.encode`."""
    proc, url = start_server(MODEL)
    try:
        resp = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120).embeddings.create(
            input=TEXTS, model=MODEL, encoding_format="float"
        )
    finally:
        assert stop_server(proc)
    got = np.asarray([d.embedding for d in resp.data])
    fp32 = minilm.encode(TEXTS, precision="fp32")
    cos = (got * fp32).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() >= 0.9999, cos


def test_models_lists_the_served_model(client, minilm):
    (info,) = client.models.list().data
    assert info.id == MODEL
    extra = info.model_extra["embforge"]
    assert extra["dimensions"] == minilm.hidden_size and extra["max_input_tokens"] == minilm.max_seq_len
    assert extra["prompts"] == minilm.prompts


def test_error_paths_through_the_client(server, client):
    with pytest.raises(openai.BadRequestError, match="must not be empty"):
        client.embeddings.create(input=[], model=MODEL)
    with pytest.raises(openai.BadRequestError, match=r"input\[0\] is empty"):
        client.embeddings.create(input="", model=MODEL)
    with pytest.raises(openai.APIStatusError, match="too many inputs") as exc:
        client.embeddings.create(input=["x"] * 65, model=MODEL)
    assert exc.value.status_code == 413
    with pytest.raises(openai.APIStatusError, match="the limit is 256") as exc:
        client.embeddings.create(input="word " * 400, model=MODEL)
    assert exc.value.status_code == 413
    for bad in (0, 385):
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(input="x", model=MODEL, dimensions=bad)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(input="x", model="text-embedding-3-small")
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(input="x", model=MODEL)
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    resp = httpx.post(f"{server}/v1/embeddings", content=b'{"input": ["x"', headers=headers)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(f"{server}/v1/embeddings", json={"input": "x" * 400_000, "model": MODEL}, headers=headers)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


def test_queue_full_answers_503_with_retry_after(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"input": [f"request text number {i} " * 20 for i in range(64)], "model": MODEL}
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(f"{server}/v1/embeddings", json=body, headers=headers, timeout=300), range(8))
        )
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 2, codes  # the queue holds two such requests
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "overloaded"


def test_sigterm_finishes_in_flight_requests(minilm_dir):
    proc, url = start_server(MODEL)
    body = {"input": [f"in flight text {i} " * 30 for i in range(64)], "model": MODEL}
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{url}/v1/embeddings", json=body, timeout=300))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the request is queued or running
        if "embforge_queue_inputs 64.0" in httpx.get(f"{url}/metrics").text:
            break
        time.sleep(0.02)
    assert stop_server(proc)
    thread.join(300)
    assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 64
