"""`torchrun -m embforge train` (contrastive and mlm stages) on 2 CPU processes follows the 1-process trajectory."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from .helpers import free_port, records, run_ok, tiny_embedder
from .test_mlm import TINY_MODEL, corpus, recipe_dict  # noqa: F401 (corpus is a fixture)

RECIPE = """
model: {{name_or_path: {model}, max_seq_len: 32}}
output_dir: {out}
stages:
  - name: s
    steps: 4
    log_every: 1
    precision: fp32
    data:
      batch_size: {batch}
      num_negatives: 1
      datasets: [{{name: d, path: d.jsonl}}]
    loss: {{temperature: 0.05, symmetric: true}}
    optim: {{lr: 1.0e-3}}
"""


def _torchrun() -> str:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found beside this Python")
    return torchrun


def _same_run(one, two) -> None:
    """Same logged losses and the same final weights."""
    rows = lambda run: [json.loads(x) for x in run.read_text().splitlines()]  # noqa: E731
    a, b = rows(one[0]), rows(two[0])
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r.get("loss") for r in b] == pytest.approx([r.get("loss") for r in a], abs=1e-5, nan_ok=True)
    x, y = load_file(str(one[1])), load_file(str(two[1]))
    assert set(x) == set(y)
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-4), (k, (x[k] - y[k]).abs().max())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(tmp_path, parallel):
    torchrun = _torchrun()
    model = tiny_embedder(dropout=0.0).save(tmp_path / "tiny")  # no dropout: ranks draw different masks
    with (tmp_path / "d.jsonl").open("w") as f:
        for r in records(40, num_negatives=1, seed=5):
            f.write(json.dumps({"query": r.query, "positive": r.positive, "negatives": r.negatives}) + "\n")
    (tmp_path / "one.yaml").write_text(RECIPE.format(model=model, out=tmp_path / "one", batch=4))
    (tmp_path / "two.yaml").write_text(
        RECIPE.format(model=model, out=tmp_path / "two", batch=2) + f"parallel: {parallel}\n"
    )
    run_ok([sys.executable, "-m", "embforge", "train", "one.yaml"], tmp_path)
    run_ok(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "embforge",
            "train",
            "two.yaml",
        ],
        tmp_path,
    )
    _same_run(
        (tmp_path / "one" / "01-s" / "metrics.jsonl", tmp_path / "one" / "final" / "model.safetensors"),
        (tmp_path / "two" / "01-s" / "metrics.jsonl", tmp_path / "two" / "final" / "model.safetensors"),
    )


def test_two_process_mlm_matches_one_process(corpus, tmp_path):  # noqa: F811
    """Each process trains on its half of every batch (in micro-batches of 2): the 1-process trajectory.
    The 1-process run reads the same recipe in the pre-0.2 MLM layout through the old command name."""
    torchrun = _torchrun()
    recipe = recipe_dict(corpus, tmp_path / "two", steps=4, log_every=1, eval_every=2, save_every=2)
    recipe["stages"][0]["mlm"].update(batch_size=8, micro_batch_size=2)
    recipe["stages"][0]["optim"] = {"lr": 3e-3}
    (tmp_path / "two.yaml").write_text(json.dumps(recipe))
    old_layout = {
        "objective": "mlm",
        "output_dir": str(tmp_path / "one"),
        "data_root": str(corpus),
        "model": {"overrides": TINY_MODEL, "tokenizer": str(corpus / "tokenizer")},
        "data": {"files": ["corpus.txt"], "format": "text", "chunk_len": 32, "heldout_fraction": 0.1},
        "steps": 4,
        "batch_size": 8,
        "micro_batch_size": 2,
        "optim": {"lr": 3e-3},
        "precision": "fp32",
        "log_every": 1,
        "eval_every": 2,
        "save_every": 2,
    }
    (tmp_path / "one.yaml").write_text(json.dumps(old_layout))
    run_ok([sys.executable, "-m", "embforge", "pretrain-mlm", "one.yaml", "--device", "cpu"], tmp_path)
    port = str(free_port())
    run_ok([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "embforge", "train", "two.yaml"], tmp_path)
    last = "01-mlm/checkpoints/step-00000004/model.safetensors"
    _same_run(
        (tmp_path / "one" / "01-mlm" / "metrics.jsonl", tmp_path / "one" / last),
        (tmp_path / "two" / "01-mlm" / "metrics.jsonl", tmp_path / "two" / last),
    )
    rows = [json.loads(x) for x in (tmp_path / "two" / "01-mlm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/masked_acc" in r] == [0, 2, 4]
    assert all(r["examples_per_s"] > 0 for r in rows[1:])  # counted over both processes
    assert (tmp_path / "two" / "final" / "config.json").is_file()
