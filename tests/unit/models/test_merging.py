"""embforge merge: soups, slerp and task vectors of saved folders, tensor by tensor (models/merging.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from embforge.cli import main
from embforge.errors import ConfigError
from embforge.modeling.head import HeadSpec
from embforge.models.build import apply_lora
from embforge.models.embedder import Embedder
from embforge.models.merging import merge
from embforge.models.spec import LoraConfig
from embforge.models.tiny import tiny_bert, tiny_nv_embedder

TEXTS = ["sort a list", "open the file and read data", "the cat runs fast"]


def bert(seed: int, **overrides) -> Embedder:
    backbone, tokenizer = tiny_bert(seed, **overrides)
    return Embedder(backbone, tokenizer, HeadSpec(pooling="mean"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return {seed: bert(seed).save(root / f"m{seed}") for seed in (0, 1, 2)}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_endpoints_and_a_model_merged_with_itself_come_back_bit_for_bit(folders, tmp_path):
    a, b = folders[0], folders[1]
    cases = {
        "w10": ([a, b], dict(weights=[1.0, 0.0]), a),
        "w01": ([a, b], dict(weights=[0.0, 1.0]), b),
        "t0": ([a, b], dict(method="slerp", t=0.0), a),
        "t1": ([a, b], dict(method="slerp", t=1.0), b),
        "self-linear": ([a, a, a], dict(weights=[0.3, 0.3, 0.4]), a),
        "self-slerp": ([a, a], dict(method="slerp", t=0.3), a),
        "self-ties": ([a, a], dict(method="ties", base=b), a),
        "self-task": ([a], dict(method="task_arithmetic", base=b), a),
    }
    for name, (models, kwargs, expected) in cases.items():
        out = merge(models, tmp_path / name, show_progress=False, **kwargs)
        assert equal(weights(out), weights(expected)), name


def test_slerp_is_the_closed_form_per_tensor(folders, tmp_path):
    a, b = weights(folders[0]), weights(folders[1])
    t = 0.3
    out = weights(merge([folders[0], folders[1]], tmp_path / "s", method="slerp", t=t, show_progress=False))
    checked = 0
    for name, x in a.items():
        x, y = x.double(), b[name].double()
        cos = float((x * y).sum() / (x.norm() * y.norm()))
        if x.norm() == 0 or y.norm() == 0 or abs(cos) > 0.9995:
            expected = (1 - t) * x + t * y
        else:
            omega = math.acos(cos)
            expected = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
            checked += 1
        torch.testing.assert_close(out[name], expected.float(), rtol=1e-6, atol=1e-7)
    assert checked > 10  # random weight matrices are far from parallel: the arc, not the line


def test_linear_soup_averages_and_the_result_loads_and_embeds(folders, tmp_path):
    out = merge(list(folders.values()), tmp_path / "soup", weights=[1, 1, 2], show_progress=False)
    got, parts = weights(out), [weights(f) for f in folders.values()]
    for name, value in got.items():
        expected = (parts[0][name].double() + parts[1][name].double() + 2 * parts[2][name].double()) / 4
        torch.testing.assert_close(value, expected.float(), rtol=0, atol=1e-7)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["weights"] == [0.25, 0.25, 0.5]
    model = Embedder.load(out, device="cpu")
    assert model.encode(TEXTS).shape == (3, 64)


def test_ties_on_hand_made_task_vectors(tmp_path):
    """Three task vectors on one LayerNorm bias (every other tensor: the base's), by hand."""
    base = bert(0)
    name = "embeddings.LayerNorm.bias"
    n = dict(base.backbone.named_parameters())[name].numel()
    taus = [[2, -1, 3, 0.5], [1, 2, -4, 0.25], [-1, 1, -1, 0.5]]
    with torch.no_grad():
        dict(base.backbone.named_parameters())[name].zero_()
    base_dir = base.save(tmp_path / "base")
    models = []
    for i, tau in enumerate(taus):
        m = Embedder.load(base_dir, device="cpu")
        with torch.no_grad():
            dict(m.backbone.named_parameters())[name][:4] = torch.tensor(tau)
        models.append(m.save(tmp_path / f"t{i}"))
    # no trim: signs of the sums (+, +, -, +); the mean of the entries that agree
    full = weights(merge(models, tmp_path / "full", method="ties", base=base_dir, show_progress=False))
    torch.testing.assert_close(full[name][:4], torch.tensor([1.5, 1.5, -2.5, (0.5 + 0.25 + 0.5) / 3]))
    # keep the 2 largest of each (the third's three 1s tie at the 2nd largest: all kept):
    # [2, 0, 3, 0], [0, 2, -4, 0], [-1, 1, -1, 0] -> sums (1, 3, -2, 0)
    trimmed = weights(
        merge(models, tmp_path / "trim", method="ties", base=base_dir, density=2 / n, show_progress=False)
    )
    assert trimmed[name][:4].tolist() == [2.0, 1.5, -2.5, 0.0]
    assert not trimmed[name][4:].any()
    assert equal(
        {k: v for k, v in trimmed.items() if k != name}, {k: v for k, v in weights(base_dir).items() if k != name}
    )
    # task arithmetic: base + λ Σ τ
    task = weights(
        merge(models, tmp_path / "task", method="task_arithmetic", base=base_dir, scale=0.5, show_progress=False)
    )
    torch.testing.assert_close(task[name][:4], torch.tensor([1.0, 1.0, -1.0, 0.625]))


def test_dare_drops_at_the_density_and_rescales_deterministically(folders, tmp_path):
    kwargs = dict(method="dare_linear", base=folders[0], density=0.25, seed=3, show_progress=False)
    first = weights(merge([folders[1]], tmp_path / "d1", **kwargs))
    again = weights(merge([folders[1]], tmp_path / "d2", **kwargs))
    assert equal(first, again)
    base, model = weights(folders[0]), weights(folders[1])
    name = "encoder.layer.0.attention.self.query.weight"
    tau, got = (model[name] - base[name]).double(), (first[name] - base[name]).double()
    kept = got.abs() > 1e-6
    assert 0.2 < kept.float().mean() < 0.3
    torch.testing.assert_close(got[kept], tau[kept] / 0.25, rtol=1e-5, atol=1e-6)


def nv_model(seed: int, adapter: bool) -> Embedder:
    model = tiny_nv_embedder(prompts={"query": "instruct: find a file\nquery: "})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.pooler.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # heads that differ
    if adapter:
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for key, p in model.backbone.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.05)
    return model


def test_lora_deltas_and_heads_merge_and_the_result_loads_in_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("peft")
    with_adapter = nv_model(1, adapter=True)
    kept = with_adapter.save(tmp_path / "kept", merge_lora=False)
    merged_copy = with_adapter.save(tmp_path / "merged", merge_lora=True)
    other = nv_model(2, adapter=False).save(tmp_path / "other")
    # the adapter folder and the merged folder are one model: their soup is that model again
    out = merge([kept, merged_copy], tmp_path / "soup", show_progress=False)
    assert not (out / "adapter").exists()
    expected = with_adapter.encode(TEXTS, prompt_name="query", precision="fp32")
    model = st.SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    got = model.encode(TEXTS, prompt_name="query")
    assert (got * expected).sum(1).min() >= 0.99999
    # heads average like any weight
    half = weights(merge([kept, other], tmp_path / "half", show_progress=False))
    a, b = weights(merged_copy), weights(other)
    for name in (n for n in half if n.startswith("pooler.")):
        assert torch.equal(half[name], ((a[name].double() + b[name].double()) / 2).float()), name


def test_models_that_differ_are_refused_naming_what_differs(folders, tmp_path):
    deeper = bert(0, num_hidden_layers=3).save(tmp_path / "deeper")
    with pytest.raises(ConfigError, match=r"tensor 'encoder\.layer\.2\.\S+' is only in .*deeper"):
        merge([folders[0], deeper], tmp_path / "x", show_progress=False)
    wider = bert(0, intermediate_size=256).save(tmp_path / "wider")
    with pytest.raises(ConfigError, match=r"tensor 'encoder\.layer\.0\.intermediate\.dense\.bias'"):
        merge([folders[0], wider], tmp_path / "x", show_progress=False)
    lower = Embedder.load(folders[1], device="cpu")
    lower.head = lower.head.replace(prompts={"query": "q: "})
    prompted = lower.save(tmp_path / "prompted")
    with pytest.raises(ConfigError, match="config_sentence_transformers.json.prompts"):
        merge([folders[0], prompted], tmp_path / "x", show_progress=False)
    with pytest.raises(ConfigError, match="slerp merges exactly two"):
        merge(list(folders.values()), tmp_path / "x", method="slerp")
    with pytest.raises(ConfigError, match="ties needs a base"):
        merge([folders[0]], tmp_path / "x", method="ties")
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_cli_merge(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["merge", str(folders[0]), str(folders[1]), "--method", "slerp", "--t", "0.5", "--output", str(out)]) == 0
    )
    assert "merged 2 models (slerp)" in capsys.readouterr().out
    assert Embedder.load(out, device="cpu").encode(TEXTS).shape == (3, 64)
    assert main(["merge", str(folders[0]), "--output", str(tmp_path / "y"), "--method", "ties"]) == 2


_RSS = r"""
import resource, sys, torch
from embforge.models.merging import merge
folder, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = {"base": folder} if method == "ties" else {}
merge([folder] * 3, out, method=method, weights=[0.2, 0.3, 0.5], density=0.5, show_progress=False, **kwargs)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merging_streams_peak_memory_below_one_and_a_half_models(minilm_dir, method, tmp_path):
    size = (minilm_dir / "model.safetensors").stat().st_size  # 90 MB, half of it one embedding matrix
    result = subprocess.run(
        [sys.executable, "-c", _RSS, str(minilm_dir), str(tmp_path / "out"), method],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = int(result.stdout.split()[-1])
    assert growth <= 1.5 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    out = weights(tmp_path / "out")
    assert equal(out, load_file(str(minilm_dir / "model.safetensors")))  # three copies of one model: itself


def test_the_cli_knows_every_method_and_the_package_exports_merge():
    import embforge
    from embforge.cli import MERGE_METHODS
    from embforge.models.merging import METHODS

    assert MERGE_METHODS == METHODS and embforge.merge is merge
