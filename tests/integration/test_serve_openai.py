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


SAMPLE = [f"passage {i}: {t}" for i in range(25) for t in ("a list sorted in Python", "a cat on a mat")]


@pytest.fixture(scope="module")
def calibration(minilm, tmp_path_factory):
    """int8/uint8 ranges of MiniLM at 384 and 128 dimensions, written by `embforge calibrate`."""
    from embforge.cli import main
    from embforge.quantization import Calibration

    folder = tmp_path_factory.mktemp("calibration")
    (folder / "sample.txt").write_text("\n".join(SAMPLE) + "\n")
    args = ["--input", str(folder / "sample.txt"), "--dimensions", "384,128", "--output", str(folder / "c.json")]
    assert main(["calibrate", MODEL, *args, "--precision", "fp32"]) == 0
    return folder / "c.json", Calibration.load(folder / "c.json")


@pytest.fixture(scope="module", params=["torch", "onnx"])
def server(request, minilm_dir, calibration):
    # fp32 on both backends, so answers equal `Embedder.encode(precision="fp32")` to float rounding;
    # the default (auto) precision is tested on its own below
    torch = request.param == "torch"
    model = MODEL if torch else str(request.getfixturevalue("onnx_minilm"))
    proc, url = start_server(
        model,
        "--served-model-name", MODEL, "--api-key", KEY, "--max-items", "64", "--max-queued-items", "128",
        "--max-body-bytes", "300000", "--calibration", str(calibration[0]),
        *(["--precision", "fp32"] if torch else []),
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


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_compact_formats_through_the_client(client, minilm, calibration, dtype):
    from embforge.quantization import quantize_embeddings

    for dimensions in (384, 128):
        ranges = calibration[1].ranges[dimensions] if dtype in ("int8", "uint8") else None
        served = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="float", dimensions=dimensions)
        floats = np.asarray([d.embedding for d in served.data], dtype=np.float32)
        expected = quantize_embeddings(floats, dtype, ranges)
        resp = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format=dtype, dimensions=dimensions)
        got = np.asarray([d.embedding for d in resp.data]).astype(expected.dtype)
        assert got.tobytes() == expected.tobytes()  # byte for byte the offline quantisation of the served floats
        packed = client.embeddings.create(
            input=TEXTS,
            model=MODEL,
            encoding_format="base64",
            dimensions=dimensions,
            extra_body={"output_dtype": dtype},
        )
        raw = b"".join(base64.b64decode(d.embedding) for d in packed.data)
        assert raw == expected.tobytes()
        # the offline model: its floats equal the served ones to rounding, so at most a stray level
        offline = quantize_embeddings(minilm.encode(TEXTS, dimensions=dimensions, precision="fp32"), dtype, ranges)
        if dtype in ("int8", "uint8"):
            assert np.abs(offline.astype(int) - expected.astype(int)).max() <= 1
        else:
            assert np.unpackbits(offline.view(np.uint8) ^ expected.view(np.uint8)).sum() <= 1
    with pytest.raises(openai.BadRequestError, match="not calibrated"):
        client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="int8", dimensions=64)


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
    assert extra["dimensions"] == minilm.hidden_size and extra["max_input_tokens"] == minilm.head.max_seq_len
    assert extra["prompts"] == minilm.head.prompts


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


def _minilm_adapter(seed: int, folder):
    """MiniLM with a LoRA adapter (rank 4 on query/value and every `dense` layer, BERT's pooler
    included, with random non-zero deltas), saved unmerged."""
    import torch

    from embforge.models.build import apply_lora
    from embforge.models.embedder import Embedder
    from embforge.models.spec import LoraConfig

    model = Embedder.load(MODEL, device="cpu")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "value", "dense"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval().save(folder, merge_lora=False)


def test_two_models_and_two_adapters_in_one_process(minilm, tmp_path):
    from embforge.models.embedder import Embedder

    a, b = _minilm_adapter(1, tmp_path / "a"), _minilm_adapter(2, tmp_path / "b")
    merged = Embedder.load(b, device="cpu").save(tmp_path / "b-merged")  # a second model on its own weights
    proc, url = start_server(
        [f"{MODEL}={MODEL}", f"merged={merged}"], "--lora-modules", f"ad-a={a}", f"ad-b={b}", "--precision", "fp32"
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {MODEL, "merged", "ad-a", "ad-b"}
        answers = {}
        with ThreadPoolExecutor(8) as pool:  # mixed traffic: all four ids at once
            futures = {
                (m, i): pool.submit(client.embeddings.create, input=TEXTS, model=m, encoding_format="float")
                for m in (MODEL, "merged", "ad-a", "ad-b")
                for i in range(2)
            }
            for key, future in futures.items():
                answers[key] = np.asarray([d.embedding for d in future.result().data])
        with pytest.raises(openai.NotFoundError, match="ad-c"):
            client.embeddings.create(input="x", model="ad-c")
    finally:
        assert stop_server(proc)
    offline = {
        MODEL: minilm.encode(TEXTS, precision="fp32"),
        "merged": Embedder.load(merged, device="cpu").encode(TEXTS, precision="fp32"),
        "ad-a": Embedder.load(a, device="cpu").encode(TEXTS, precision="fp32"),
        "ad-b": Embedder.load(b, device="cpu").encode(TEXTS, precision="fp32"),
    }
    for (model, _), got in answers.items():
        cos = (got * offline[model]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(offline[model], axis=1)
        assert cos.min() >= 0.99999, (model, cos)
    assert np.abs(offline["ad-a"] - offline[MODEL]).max() > 1e-3  # the adapters change the embeddings


def test_an_adapter_of_another_base_is_refused_at_start(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    a = _minilm_adapter(1, tmp_path / "a")
    proc = subprocess.run(
        [sys.executable, "-m", "embforge", "serve", str(tiny_model_dir), "--lora-modules", f"x={a}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(a / "embforge.json") in proc.stderr or str(a / "model.safetensors") in proc.stderr, proc.stderr


def test_instructions_tasks_and_their_errors_through_the_client(minilm, tmp_path):
    """A live server of an instruction model (tiny NV-Embed-style decoder: instruction attended
    to, left out of pooling) beside MiniLM (no template, no calibration): `instruction` and
    `task` sent by the official client equal `Embedder.encode` with the same instruction; the
    errors a client meets are OpenAI-shaped 400s."""
    from embforge.models.embedder import Embedder
    from embforge.models.tiny import tiny_nv_embedder

    template = "Instruct: {instruction}\nQuery: "
    folder = tiny_nv_embedder(seed=5, instruction_template=template, precision="fp32").eval().save(tmp_path / "nv")
    (folder / "instructions.yaml").write_text("by_task:\n  Code: Given a question, retrieve code that answers it\n")
    proc, url = start_server([f"nv={folder}", f"{MODEL}={MODEL}"], "--precision", "fp32")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)

        def embed(model, **extra):
            data = client.embeddings.create(input=TEXTS, model=model, encoding_format="float", extra_body=extra).data
            return np.asarray([d.embedding for d in data])

        free = "Find the passage that answers the question"
        got = {"free": embed("nv", instruction=free), "task": embed("nv", task="Code")}
        got["document"] = embed("nv", task="Code", input_type="document")
        with pytest.raises(openai.BadRequestError, match=r"\['Code'\]") as exc:
            embed("nv", task="Sorting")
        assert exc.value.body["param"] == "task"
        with pytest.raises(openai.BadRequestError, match="no instruction template") as exc:
            embed(MODEL, instruction=free)
        assert exc.value.body["param"] == "instruction"
        with pytest.raises(openai.BadRequestError, match="needs calibration ranges") as exc:
            embed(MODEL, output_dtype="int8")
        assert exc.value.body["code"] == "no_calibration"
        assert embed(MODEL).shape == (len(TEXTS), minilm.hidden_size)  # and it keeps answering
    finally:
        assert stop_server(proc)
    offline = Embedder.load(folder, device="cpu", precision="fp32")
    expected = {
        "free": offline.encode(TEXTS, prompt=template.format(instruction=free)),
        "task": offline.encode(
            TEXTS, prompt=template.format(instruction="Given a question, retrieve code that answers it")
        ),
        "document": offline.encode(TEXTS),
    }
    for key, vectors in expected.items():
        np.testing.assert_allclose(got[key], vectors, atol=1e-5, err_msg=key)
    assert np.abs(expected["task"] - expected["document"]).max() > 1e-3  # the instruction changes the vector
