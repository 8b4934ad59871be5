"""Instructions per request on a real (tiny) model: equal to `Embedder.encode` with the same instruction."""

from __future__ import annotations

import numpy as np
import pytest

from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_bert
from embforge.serve.app import ServeSettings, create_app
from embforge.serve.backend import TorchBackend
from embforge.serve.requests import ServedModel

TEMPLATE = "Instruct: {instruction}\nQuery: "
TASKS = {"retrieval": "Given a web search query, retrieve relevant passages", "sts": "Retrieve similar text"}
TEXTS = ["sort a list", "the cat runs fast"]


@pytest.fixture(scope="module")
def instructed():
    model, tokenizer = tiny_bert(seed=3)
    # pool_prompt false: the instruction is attended to and left out of pooling (NV-Embed)
    emb = Embedder(
        model,
        tokenizer,
        HeadSpec(
            pooling="mean",
            normalize=True,
            max_seq_len=64,
            pool_prompt=False,
            instruction_template=TEMPLATE,
            prompts={"document": "passage: "},
        ),
        precision="fp32",
    )
    return emb.eval()


def _client(model, **options):
    from fastapi.testclient import TestClient

    app = create_app([ServedModel("m", TorchBackend(model, "m"), **options)], ServeSettings())
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    return client


def _embed(client, **body):
    resp = client.post("/v1/embeddings", json={"input": TEXTS, "model": "m", **body})
    assert resp.status_code == 200, resp.text
    return np.asarray([d["embedding"] for d in resp.json()["data"]])


def test_instruction_and_task_equal_the_offline_encoder(instructed):
    client = _client(instructed, instructions=TASKS)
    try:
        free = "Find code that answers the question"
        expected = instructed.encode(TEXTS, prompt=instructed.head.instruction_prompt(free), precision="fp32")
        np.testing.assert_allclose(_embed(client, instruction=free), expected, atol=1e-5)
        by_task = instructed.encode(TEXTS, prompt=TEMPLATE.format(instruction=TASKS["sts"]), precision="fp32")
        np.testing.assert_allclose(_embed(client, task="sts"), by_task, atol=1e-5)
        # masked from pooling, yet attended to: the instruction changes the vector
        plain = instructed.encode(TEXTS, prompt="", precision="fp32")
        assert np.abs(by_task - plain).max() > 1e-3
        # documents get none: their own prompt, as without an instruction
        docs = instructed.encode_documents(TEXTS, precision="fp32")
        np.testing.assert_allclose(_embed(client, task="sts", input_type="document"), docs, atol=1e-5)
        info = client.get("/v1/models").json()["data"][0]["embforge"]
        assert info["instruction_template"] == TEMPLATE and info["tasks"] == TASKS
    finally:
        client.__exit__(None, None, None)


def _error(resp, param):
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    return err["message"]


def test_instruction_errors_are_openai_shaped_400s(instructed, tiny_embedder):
    client = _client(instructed, instructions=TASKS)
    plain = _client(tiny_embedder)
    try:
        post = client.post
        assert "['retrieval', 'sts']" in _error(
            post("/v1/embeddings", json={"input": "x", "model": "m", "task": "nope"}), "task"
        )
        body = {"input": "x", "model": "m", "task": "sts", "instruction": "y"}
        _error(post("/v1/embeddings", json=body), "task")
        _error(
            post("/v1/embeddings", json={"input": "x", "model": "m", "instruction": "y", "prompt_name": "document"}),
            "instruction",
        )
        _error(post("/v1/embeddings", json={"input": "x", "model": "m", "instruction": " "}), "instruction")
        _error(post("/v1/embeddings", json={"input": [[101, 7, 102]], "model": "m", "instruction": "y"}), "instruction")
        message = _error(
            plain.post("/v1/embeddings", json={"input": "x", "model": "m", "instruction": "y"}), "instruction"
        )
        assert "no instruction template" in message
        assert plain.post("/v1/embeddings", json={"input": "x", "model": "m"}).status_code == 200
    finally:
        client.__exit__(None, None, None)
        plain.__exit__(None, None, None)


def test_serve_reads_the_instruction_table(tmp_path, tiny_model_dir):
    from embforge.cli import _serving_instructions, build_parser
    from embforge.errors import ConfigError

    def table(*flags):
        return _serving_instructions(
            build_parser().parse_args(["serve", str(tiny_model_dir), *flags]), str(tiny_model_dir)
        )

    shipped = table("--instructions", "nv-embed")
    assert shipped["MLQuestions"].startswith("Given a question about machine learning") and "retrieval" in shipped
    assert table() == {}
    bad = tmp_path / "t.yaml"
    bad.write_text("by_task:\n  Mine: Find my things\nby_typo: {}\n")
    with pytest.raises(ConfigError, match="by_typo"):
        table("--instructions", str(bad))
    beside = tmp_path / "model"
    beside.mkdir()
    (beside / "instructions.yaml").write_text("by_task:\n  Mine: Find my things\n")
    assert _serving_instructions(build_parser().parse_args(["serve", str(beside)]), str(beside)) == {
        "Mine": "Find my things"
    }
