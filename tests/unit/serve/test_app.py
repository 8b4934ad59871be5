"""The HTTP API on a dummy backend: shapes, extensions, limits and every error path."""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest
from tests.unit.serve.conftest import vector

from embforge.serve.requests import ServedModel


def _post(client, body, **kwargs):
    return client.post("/v1/embeddings", json=body, **kwargs)


def _error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_float_and_base64_give_the_model_embeddings_with_real_usage(client, backend):
    texts = ["sort a list", "read the file now"]
    expected = np.stack([vector(backend.ids(t, None)) for t in texts])
    floats = _post(client, {"input": texts, "model": "dummy"}).json()
    assert floats["object"] == "list" and floats["model"] == "dummy"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    np.testing.assert_allclose([d["embedding"] for d in floats["data"]], expected, atol=1e-6)
    # [CLS] + words + [SEP]: 5 + 6 tokens
    assert floats["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    b64 = _post(client, {"input": texts, "model": "dummy", "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, np.asarray([d["embedding"] for d in floats["data"]], dtype=np.float32))


def test_single_string_and_token_id_inputs(client, backend):
    one = _post(client, {"input": "sort a list", "model": "dummy"}).json()
    assert len(one["data"]) == 1
    ids = backend.ids("sort a list", None)
    as_ids = _post(client, {"input": ids, "model": "dummy"}).json()
    as_id_lists = _post(client, {"input": [ids, ids[:3]], "model": "dummy"}).json()
    np.testing.assert_allclose(as_ids["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-6)
    np.testing.assert_allclose(as_id_lists["data"][1]["embedding"], vector(ids[:3]), atol=1e-6)
    assert as_id_lists["usage"]["prompt_tokens"] == len(ids) + 3


def test_dimensions_truncate_and_renormalise(client, backend):
    full = np.asarray(_post(client, {"input": "cat", "model": "dummy"}).json()["data"][0]["embedding"])
    small = np.asarray(
        _post(client, {"input": "cat", "model": "dummy", "dimensions": 4}).json()["data"][0]["embedding"]
    )
    np.testing.assert_allclose(small, full[:4] / np.linalg.norm(full[:4]), atol=1e-6)


def test_input_type_and_prompt_name_select_the_model_prompt(client, backend):
    _post(client, {"input": "cat", "model": "dummy"})
    q = _post(client, {"input": "cat", "model": "dummy", "input_type": "query"}).json()
    _post(client, {"input": "cat", "model": "dummy", "prompt_name": "document"})
    assert backend.prompt_names == [None, "query", "document"]
    np.testing.assert_allclose(q["data"][0]["embedding"], vector(backend.ids("cat", "query")), atol=1e-6)
    info = client.get("/v1/models").json()["data"][0]
    assert info["id"] == "dummy" and info["embforge"]["prompts"] == {"query": "q:", "document": "d:"}
    _error(_post(client, {"input": "cat", "model": "dummy", "prompt_name": "qurey"}), 400)
    _error(_post(client, {"input": "cat", "model": "dummy", "input_type": "passage"}), 400)
    _error(_post(client, {"input": "cat", "model": "dummy", "input_type": "query", "prompt_name": "query"}), 400)


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"input": [], "model": "dummy"}, 400, "invalid_request"),
        ({"input": "", "model": "dummy"}, 400, "invalid_request"),
        ({"input": ["fine", "   "], "model": "dummy"}, 400, "invalid_request"),
        ({"input": [[]], "model": "dummy"}, 400, "invalid_request"),
        ({"input": [[1, 2, 5000]], "model": "dummy"}, 400, "invalid_request"),
        ({"input": ["a"] * 5, "model": "dummy"}, 413, "too_many_inputs"),
        ({"input": "one two three four five six seven", "model": "dummy"}, 413, "input_too_long"),
        ({"input": "cat", "model": "dummy", "dimensions": 0}, 400, "invalid_request"),
        ({"input": "cat", "model": "dummy", "dimensions": 17}, 400, "invalid_request"),
        ({"input": "cat", "model": "dummy", "dimensions": "8"}, 400, "invalid_request"),
        ({"input": "cat", "model": "dummy", "encoding_format": "int4"}, 400, "invalid_request"),
        ({"input": "cat", "model": "dummy", "encoding_format": "int8"}, 400, "no_calibration"),
        ({"input": "cat", "model": "gpt-embed"}, 404, "model_not_found"),
        ({"input": "cat"}, 400, "invalid_request"),
        ({"input": 3, "model": "dummy"}, 400, "invalid_request"),
        ({"input": "cat", "model": "dummy", "temperature": 1}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(make_client, body, status, code):
    client = make_client(max_items=4)
    err = _error(_post(client, body), status, code)
    assert err["type"] == "invalid_request_error"


def test_over_long_input_is_truncated_when_configured(make_client, backend):
    client = make_client(truncate=True)
    text = "one two three four five six seven"
    resp = _post(client, {"input": text, "model": "dummy"}).json()
    assert resp["usage"]["prompt_tokens"] == backend.head.max_seq_len
    full = backend.ids(text, None)
    np.testing.assert_allclose(resp["data"][0]["embedding"], vector(full[:7] + full[-1:]), atol=1e-6)


def test_max_input_tokens_below_the_model_maximum(make_client):
    client = make_client(max_input_tokens=4)
    assert _post(client, {"input": "one two", "model": "dummy"}).status_code == 200
    err = _error(_post(client, {"input": "one two three", "model": "dummy"}), 413, "input_too_long")
    assert "5 tokens" in err["message"] and "limit is 4" in err["message"]


def test_malformed_json_and_non_object_bodies(client):
    headers = {"content-type": "application/json"}
    assert (
        "not valid JSON"
        in _error(client.post("/v1/embeddings", content=b'{"input": ', headers=headers), 400)["message"]
    )
    _error(client.post("/v1/embeddings", content=b"\xff\xfe", headers=headers), 400)
    _error(client.post("/v1/embeddings", content=b'["cat"]', headers=headers), 400)


def test_body_too_large(make_client):
    client = make_client(max_body_bytes=200)
    _error(_post(client, {"input": "x" * 300, "model": "dummy"}), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit holds on the streamed body too
        yield b'{"input": "'
        for _ in range(10):
            yield b"y" * 50
        yield b'", "model": "dummy"}'

    _error(client.post("/v1/embeddings", content=chunks()), 413, "payload_too_large")
    assert _post(client, {"input": "small", "model": "dummy"}).status_code == 200


def test_api_key(make_client):
    client = make_client(api_key="s3cret")
    body = {"input": "cat", "model": "dummy"}
    _error(_post(client, body), 401, "invalid_api_key")
    _error(_post(client, body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _error(_post(client, body, headers={"Authorization": "Basic s3cret"}), 401)
    _error(client.get("/v1/models"), 401)
    _error(client.get("/metrics"), 401)
    assert _post(client, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # liveness stays open


def test_queue_full_answers_503_with_retry_after(make_client, backend):
    client = make_client(max_queued_items=3, max_items=2)
    backend.release.clear()  # the model thread blocks inside embed
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=_post(client, {"input": ["a", "b"], "model": "dummy"})))
    thread.start()
    assert backend.entered.wait(10)
    resp = _post(client, {"input": ["c", "d"], "model": "dummy"})  # 2 + 2 > 3
    _error(resp, 503, "overloaded")
    assert resp.headers["Retry-After"] == "1"
    backend.release.set()
    thread.join(10)
    assert first["r"].status_code == 200
    assert _post(client, {"input": ["c", "d"], "model": "dummy"}).status_code == 200  # room again


def test_settings_that_could_never_serve_a_request_are_refused(backend):
    from embforge.errors import InputError
    from embforge.serve.app import ServeSettings, create_app

    with pytest.raises(InputError, match="max_items"):
        create_app([ServedModel("dummy", backend)], ServeSettings(max_items=10, max_queued_items=5))
    with pytest.raises(InputError, match="max_input_tokens"):
        create_app([ServedModel("dummy", backend, max_input_tokens=9)], ServeSettings())


def test_internal_errors_do_not_leak(client, backend):
    backend.fail_with = RuntimeError("CUDA out of memory at /secret/path/model.py:42")
    err = _error(_post(client, {"input": "cat", "model": "dummy"}), 500, "internal_error")
    assert "secret" not in err["message"] and "CUDA" not in err["message"]
    backend.fail_with = None
    assert _post(client, {"input": "cat", "model": "dummy"}).status_code == 200  # the worker survived


def test_unknown_route_and_method_are_openai_shaped(client):
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_concurrent_requests_share_forward_passes_on_one_thread(client, backend):
    backend.release.clear()
    results = []
    blocker = threading.Thread(target=lambda: results.append(_post(client, {"input": "first", "model": "dummy"})))
    blocker.start()
    assert backend.entered.wait(10)
    threads = [
        threading.Thread(target=lambda i=i: results.append(_post(client, {"input": f"text {i}", "model": "dummy"})))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while client.app.state.batchers["dummy"].queued < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    backend.release.set()
    for t in [blocker, *threads]:
        t.join(10)
    assert [r.status_code for r in results] == [200] * 7
    assert backend.batches == [1, 6]  # the six waiting requests ran as one batch
    assert backend.max_inside == 1


def test_health_and_metrics(client):
    _post(client, {"input": ["a b", "c"], "model": "dummy"})
    _post(client, {"input": "", "model": "dummy"})
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'embforge_requests_total{path="/v1/embeddings",status="200"} 1.0' in text
    assert 'embforge_requests_total{path="/v1/embeddings",status="400"} 1.0' in text
    assert 'embforge_inputs_total{adapter="",model="dummy"} 2.0' in text
    assert 'embforge_tokens_total{adapter="",model="dummy"} 7.0' in text
    assert 'embforge_batch_size_count{adapter="",model="dummy"} 1.0' in text


# ---------------------------------------------------------------------------- compact output
def _calibration(backend, widths=(16, 8)):
    from embforge.models.matryoshka import truncate_dimensions
    from embforge.quantization import calibrate

    sample = np.stack([vector(backend.ids(f"sample text {i}", None)) for i in range(64)])
    return calibrate(sample, list(widths), True), truncate_dimensions


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("dimensions", [None, 8])
def test_compact_formats_equal_the_offline_quantization_byte_for_byte(make_client, backend, dtype, dimensions):
    from embforge.quantization import quantize_embeddings

    calibration, truncate = _calibration(backend)
    client = make_client(calibration=calibration)
    texts = ["sort a list", "read the file now", "cat"]
    dims = {"dimensions": dimensions} if dimensions else {}
    floats = np.asarray(
        [d["embedding"] for d in _post(client, {"input": texts, "model": "dummy", **dims}).json()["data"]],
        dtype=np.float32,
    )
    width = dimensions or backend.hidden_size
    ranges = calibration.ranges[width] if dtype in ("int8", "uint8") else None
    expected = quantize_embeddings(floats, dtype, ranges)  # (3, width) or (3, width / 8)
    as_ints = _post(client, {"input": texts, "model": "dummy", "encoding_format": dtype, **dims}).json()
    got = np.asarray([d["embedding"] for d in as_ints["data"]])
    assert got.shape == expected.shape and all(isinstance(v, int) for v in as_ints["data"][0]["embedding"])
    np.testing.assert_array_equal(got.astype(expected.dtype), expected)
    body = {"input": texts, "model": "dummy", "encoding_format": "base64", "output_dtype": dtype, **dims}
    packed = _post(client, body).json()["data"]
    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=expected.dtype) for d in packed])
    assert raw.tobytes() == expected.tobytes()
    # the dummy's floats are the model's: the same bytes as quantising Embedder-style output offline
    offline = truncate(np.stack([vector(backend.ids(t, None)) for t in texts]), width, True)
    assert quantize_embeddings(offline, dtype, ranges).tobytes() == expected.tobytes()


def test_compact_format_errors(make_client, backend):
    plain = make_client()
    for dtype in ("int8", "uint8"):
        err = _error(_post(plain, {"input": "x", "model": "dummy", "encoding_format": dtype}), 400, "no_calibration")
        assert "embforge calibrate" in err["message"]
    # binary needs no calibration
    assert _post(plain, {"input": "x", "model": "dummy", "encoding_format": "ubinary"}).status_code == 200
    calibrated = make_client(calibration=_calibration(backend, widths=(16,))[0])
    err = _error(
        _post(calibrated, {"input": "x", "model": "dummy", "encoding_format": "int8", "dimensions": 8}),
        400,
        "no_calibration",
    )
    assert "[16]" in err["message"] and err["param"] == "dimensions"
    body = {"input": "x", "model": "dummy", "encoding_format": "int8", "output_dtype": "binary"}
    assert _error(_post(calibrated, body), 400)["param"] == "output_dtype"
    _error(_post(calibrated, {"input": "x", "model": "dummy", "encoding_format": "int4"}), 400)
    info = calibrated.get("/v1/models").json()["data"][0]["embforge"]
    assert info["calibrated_dimensions"] == [16] and "ubinary" in info["encoding_formats"]


def test_a_calibration_for_a_wider_model_is_refused(backend):
    from embforge.errors import InputError
    from embforge.serve.app import ServeSettings, create_app

    wide = _calibration(backend)[0]
    wide = type(wide)({32: np.zeros((2, 32), np.float32)}, 10)
    with pytest.raises(InputError, match="another model"):
        create_app([ServedModel("dummy", backend, calibration=wide)], ServeSettings())
