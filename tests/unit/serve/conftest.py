"""A dummy backend: deterministic, instant, observable (records calls; can be made to block or fail)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embforge.modeling.head import HeadSpec
from embforge.modeling.tokenization import Row
from embforge.serve.app import ServeSettings, create_app
from embforge.serve.backend import Encoded
from embforge.serve.requests import ServedModel

MODEL_FIELDS = ("aliases", "calibration", "instructions", "max_input_tokens")


class DummyBackend:
    """Words are tokens; the embedding of an input is a fixed function of its token ids."""

    hidden_size = 16
    vocab_size = 1000

    def __init__(self, prompts=None, default_prompt_name=None):
        self.head = HeadSpec(max_seq_len=8, prompts=prompts or {}, default_prompt_name=default_prompt_name)
        self.prompt_names: list = []  # prompt_name of every tokenize call
        self.batches: list[int] = []  # size of every embed call
        self.release = threading.Event()
        self.release.set()  # clear() makes embed block until set()
        self.entered = threading.Event()
        self.fail_with: Exception | None = None
        self._inside = 0
        self.max_inside = 0  # most threads ever inside embed at once
        self._lock = threading.Lock()

    def ids(self, text: str, prompt_name) -> list[int]:
        words = self.head.prompt(prompt_name).split() + text.split()
        return [101] + [sum(map(ord, w)) % 900 + 1 for w in words] + [102]

    def tokenize(self, texts, prompt_name):
        self.prompt_names.append(prompt_name)
        out = []
        for t in texts:
            full = self.ids(t, prompt_name)
            most = self.head.max_seq_len
            ids = full[: most - 1] + full[-1:] if len(full) > most else full
            out.append(Encoded(Row(ids), len(ids), len(full)))
        return out

    def embed(self, batch, adapter=None):
        with self._lock:
            self._inside += 1
            self.max_inside = max(self.max_inside, self._inside)
        try:
            self.entered.set()
            self.release.wait(10)
            if self.fail_with is not None:
                raise self.fail_with
            self.batches.append(len(batch))
            return np.stack([vector(np.asarray(f.ids)) for f in batch])
        finally:
            with self._lock:
                self._inside -= 1

    def describe(self):
        return {"backend": "dummy", "dimensions": self.hidden_size, "prompts": self.head.prompts}


def vector(ids) -> np.ndarray:
    """The dummy model: a seeded random unit vector per token-id sequence."""
    rng = np.random.default_rng(abs(hash(tuple(int(i) for i in ids))) % 2**32)
    v = rng.standard_normal(DummyBackend.hidden_size).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def backend():
    return DummyBackend(prompts={"query": "q:", "document": "d:"})


@pytest.fixture
def make_client(backend):
    from fastapi.testclient import TestClient

    clients = []

    def make(**overrides):
        """``overrides``: ServeSettings fields and the served model's (calibration, max_input_tokens, ...)."""
        own = {k: overrides.pop(k) for k in MODEL_FIELDS if k in overrides}
        app = create_app([ServedModel("dummy", backend, **own)], ServeSettings(**overrides))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan: starts the model thread
        clients.append(client)
        return client

    yield make
    backend.release.set()
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()
