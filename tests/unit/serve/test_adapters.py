"""Several models and LoRA adapters in one server: each id answers what its offline model gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from embforge.errors import ConfigError
from embforge.models.embedder import Embedder
from embforge.serve.app import ServeSettings, create_app
from embforge.serve.backend import TorchBackend
from embforge.serve.requests import ServedModel

from ..train.helpers import tiny_lora_embedder

TEXTS = ["sort a list", "the cat runs fast", "read the file now please"]


def _adapter(seed: int, folder):
    """A LoRA model on the shared tiny base with non-zero deltas and its own latent head, saved unmerged."""
    model = tiny_lora_embedder(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval().save(folder, merge_lora=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_lora_embedder(7)
    base_dir = base.save(root / "base", merge_lora=True)  # B = 0: the merged base is the plain base weights
    return base_dir, _adapter(1, root / "a"), _adapter(2, root / "b")


def _offline(folder) -> np.ndarray:
    return Embedder.load(folder, device="cpu", precision="fp32").encode(TEXTS, precision="fp32")


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def server(folders):
    from fastapi.testclient import TestClient

    base_dir, a, b = folders
    base = Embedder.load(base_dir, device="cpu", precision="fp32")
    other = Embedder.load(a, device="cpu", precision="fp32")  # a second model, on its own weights
    shared = TorchBackend(base, "base", adapters={"ad-a": a, "ad-b": b})
    models = [
        ServedModel("base", shared),
        ServedModel("ad-a", shared, adapter="ad-a"),
        ServedModel("ad-b", shared, adapter="ad-b"),
        ServedModel("merged-a", TorchBackend(other, "merged-a")),
    ]
    client = TestClient(create_app(models, ServeSettings()), raise_server_exceptions=False)
    client.__enter__()
    yield client, shared
    client.__exit__(None, None, None)


def _embed(client, model):
    resp = client.post("/v1/embeddings", json={"input": TEXTS, "model": model})
    assert resp.status_code == 200, resp.text
    return np.asarray([d["embedding"] for d in resp.json()["data"]])


def test_each_id_equals_its_offline_model(server, folders):
    client, _ = server
    base_dir, a, b = folders
    for model, folder in (("base", base_dir), ("ad-a", a), ("ad-b", b), ("merged-a", a)):
        assert _cosines(_embed(client, model), _offline(folder)).min() >= 0.99999, model
    # the adapters really differ from the base and from each other
    assert _cosines(_embed(client, "ad-a"), _embed(client, "ad-b")).min() < 0.999
    listed = {m["id"]: m["embforge"] for m in client.get("/v1/models").json()["data"]}
    assert set(listed) == {"base", "ad-a", "ad-b", "merged-a"}
    assert listed["ad-a"]["adapter"] == "ad-a" and listed["base"]["adapters"] == ["ad-a", "ad-b"]


def test_mixed_concurrent_traffic_shares_forward_passes(server, folders):
    import time

    client, shared = server
    passes: list[list[str | None]] = []
    release = threading.Event()
    forward = shared._forward

    def spy(batch, adapters=None):
        release.wait(30)  # the first pass holds the model thread until every request is queued
        passes.append(list(adapters) if adapters is not None else [None] * len(batch["input_ids"]))
        return forward(batch, adapters)

    shared._forward = spy
    results: dict[str, list] = {"base": [], "ad-a": [], "ad-b": []}
    try:
        threads = [
            threading.Thread(target=lambda m=m: results[m].append(_embed(client, m)))
            for m in ("base", "ad-a", "ad-b") * 4
        ]
        for t in threads:
            t.start()
        batcher = client.app.state.batchers["base"]
        deadline = time.monotonic() + 30
        while batcher.queued < 12 * len(TEXTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join(60)
    finally:
        shared._forward = forward
    base_dir, a, b = folders
    for model, folder in (("base", base_dir), ("ad-a", a), ("ad-b", b)):
        expected = _offline(folder)
        assert len(results[model]) == 4
        assert all(_cosines(got, expected).min() >= 0.99999 for got in results[model]), model
    # two rounds (the first request, then the eleven queued with it running, three adapters
    # mixed), each cut in two where the texts' lengths halve: 4 passes (one per adapter: 8)
    assert sum(map(len, passes)) == 12 * len(TEXTS)
    assert len(passes) <= 4 and max(len(set(p)) for p in passes) == 3, passes
    metrics = client.get("/metrics").text
    import re

    counted = re.search(r'embforge_inputs_total\{adapter="ad-b",model="ad-b"\} ([0-9.]+)', metrics)
    assert counted and float(counted[1]) >= 12  # labelled by model and adapter
    mixed = re.search(r'embforge_batch_size_count\{adapter="\(mixed\)",model="base"\} ([0-9.]+)', metrics)
    assert mixed and float(mixed[1]) >= 1, metrics  # a pass of several adapters is labelled as such


def test_adapters_of_another_base_or_damaged_ones_are_refused(folders, tmp_path):
    base_dir, a, _ = folders
    # the same architecture, other base weights
    foreign = tiny_lora_embedder(1, base_seed=5)
    foreign_dir = foreign.save(tmp_path / "foreign", merge_lora=False)
    with pytest.raises(ConfigError, match=r"foreign/model.safetensors: tensor backbone\..* differs"):
        TorchBackend(Embedder.load(base_dir, device="cpu"), "base", adapters={"x": foreign_dir})
    with pytest.raises(ConfigError, match=r"adapter_config.json: missing"):
        TorchBackend(Embedder.load(base_dir, device="cpu"), "base", adapters={"x": base_dir})
    import shutil

    broken = shutil.copytree(a, tmp_path / "broken")
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"adapter 'x'.*broken"):
        TorchBackend(Embedder.load(base_dir, device="cpu"), "base", adapters={"x": broken})
    with pytest.raises(ConfigError, match="carries a LoRA adapter itself"):
        TorchBackend(Embedder.load(a, device="cpu"), "a", adapters={"x": a})


def test_bad_requests_to_an_adapter_get_4xx_and_it_keeps_answering(server, folders):
    client, _ = server
    bad = [
        {"input": [], "model": "ad-a"},
        {"input": [[1, 2, 10**9]], "model": "ad-a"},
        {"input": "x", "model": "ad-a", "dimensions": 10**6},
        {"input": "x", "model": "ad-a", "encoding_format": "int8"},  # no calibration for this adapter
        {"input": "x", "model": "ad-a", "instruction": "do it"},  # no instruction template
        {"input": "x", "model": "ad-c"},
        {"input": {"nested": True}, "model": "ad-a"},
        {"input": "x" * 10, "model": "ad-a", "unknown": 1},
    ]
    for body in bad:
        resp = client.post("/v1/embeddings", json=body)
        assert 400 <= resp.status_code < 500 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = client.post("/v1/embeddings", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert _cosines(_embed(client, "ad-a"), _offline(folders[1])).min() >= 0.99999


@pytest.mark.parametrize("texts", [TEXTS, ["abcd efgh", "ijkl mnop", "qrst uvwx"]], ids=["packed", "no-padding"])
def test_one_pass_mixing_adapters_gives_each_row_its_adapter_s_embedding(server, folders, texts):
    """Rows of the base and two adapters in one forward pass, in the packed layout (padding:
    tokens packed into one sequence) and the padded one (equal lengths: no packing)."""
    _, shared = server
    base_dir, a, b = folders
    items = shared.tokenize(texts * 2, None)
    if texts is not TEXTS:
        assert len({i.num_tokens for i in items}) == 1  # equal lengths: the padded path
    groups = ["ad-a", None, "ad-b", "ad-b", "ad-a", None]
    got = shared.embed([i.features for i in items], groups)
    offline = {
        g: Embedder.load(f, device="cpu", precision="fp32") for g, f in ((None, base_dir), ("ad-a", a), ("ad-b", b))
    }
    for row, group in enumerate(groups):
        expected = offline[group].encode([(texts * 2)[row]], precision="fp32")
        assert _cosines(got[row : row + 1], expected).min() >= 0.99999, (row, group)


def test_peft_options_the_server_does_not_implement_are_refused(folders, tmp_path):
    import json
    import shutil

    base_dir, a, _ = folders
    dora = shutil.copytree(a, tmp_path / "dora")
    config_file = dora / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"dora/adapter/adapter_config.json: use_dora = True is not supported"):
        TorchBackend(Embedder.load(base_dir, device="cpu"), "base", adapters={"x": dora})


def test_adapters_of_other_ranks_targets_and_rslora_mix_in_one_pass(folders, tmp_path):
    """The stacked matrices pad smaller ranks with zeros and leave layers an adapter does not
    adapt alone: rank 2 on every projection, rank 8 with rsLoRA on q/v only, and the base, mixed."""
    import json

    from embforge.models.build import apply_lora
    from embforge.models.spec import LoraConfig

    base_dir = folders[0]
    made = {}
    for name, r, targets, rslora in (("wide", 2, None, False), ("qv", 8, ["q_proj", "v_proj"], True)):
        model = tiny_lora_embedder(seed=11)
        model.backbone = model.backbone.merge_and_unload()  # the plain base again (B = 0), then this adapter
        apply_lora(model, LoraConfig(r=r, alpha=4, dropout=0.0, **({"target_modules": targets} if targets else {})))
        gen = torch.Generator().manual_seed(r)
        with torch.no_grad():
            for key, p in model.backbone.named_parameters():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        folder = model.eval().save(tmp_path / name, merge_lora=False)
        if rslora:  # scale alpha / sqrt(r) instead of alpha / r, read by every loader from the config
            config_file = folder / "adapter" / "adapter_config.json"
            config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_rslora": True}))
        made[name] = folder
    backend = TorchBackend(Embedder.load(base_dir, device="cpu", precision="fp32"), "base", adapters=made)
    groups = ["qv", None, "wide", "qv", "wide", None]
    texts = (TEXTS * 2)[: len(groups)]
    got = backend.embed([i.features for i in backend.tokenize(texts, None)], groups)
    offline = {g: Embedder.load(f, device="cpu", precision="fp32") for g, f in (*made.items(), (None, base_dir))}
    for row, group in enumerate(groups):
        expected = offline[group].encode([texts[row]], precision="fp32")
        assert _cosines(got[row : row + 1], expected).min() >= 0.99999, (row, group)
    plain = offline[None].encode(texts[:1], precision="fp32")
    assert _cosines(offline["qv"].encode(texts[:1], precision="fp32"), plain).min() < 0.999  # rsLoRA: a real delta
