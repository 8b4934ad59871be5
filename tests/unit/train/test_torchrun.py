"""`torchrun -m embforge train` on 2 CPU processes follows the 1-process trajectory."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from .helpers import free_port, records, run_ok, tiny_embedder

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


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(tmp_path, parallel):
    if shutil.which("torchrun") is None and not (
        os.path.dirname(sys.executable) and os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun"))
    ):
        pytest.skip("torchrun not found")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
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
    one = [json.loads(x) for x in (tmp_path / "one" / "01-s" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "01-s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())
