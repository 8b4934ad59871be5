import json

import numpy as np

from embforge.cli import main


def test_encode_txt_to_npy(tiny_model_dir, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("sort a list\nread the file\n")
    out = tmp_path / "out.npy"
    assert main(["encode", str(tiny_model_dir), "--input", str(inp), "--output", str(out), "--dimensions", "32"]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_errors_are_clear_and_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["encode", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.npy")]) == 2
    assert "in.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()
    inp = tmp_path / "in.txt"
    inp.write_text("x\n")
    assert main(["encode", "no-such-model", "--input", str(inp), "--output", str(tmp_path / "o.npy")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_eval_writes_mteb_like_json(tiny_model_dir, tmp_path):
    rows = [{"sentence1": f"the cat {i}", "sentence2": f"the dog {i % 3}", "score": float(i % 5)} for i in range(12)]
    (tmp_path / "sts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: tiny-sts, type: sts, path: sts.jsonl}\n")
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny_model_dir), "--tasks", str(tmp_path / "tasks.yaml"), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["task_name"] == "tiny-sts" and result["main_score_name"] == "cosine_spearman"
    entry = result["scores"]["test"][0]
    assert entry["hf_subset"] == "default" and -1 <= entry["main_score"] <= 1


def test_calibrate_writes_ranges_the_model_folder_serves(tiny_model_dir, tmp_path):
    import numpy as np

    from embforge.cli import _serving_calibration, build_parser
    from embforge.models.embedder import Embedder
    from embforge.quantization import Calibration, calibration_ranges

    texts = [f"some passage number {i} about topic {i % 7}" for i in range(40)]
    inp = tmp_path / "sample.txt"
    inp.write_text("\n".join(texts) + "\n")
    out = tmp_path / "cal.json"
    args = ["calibrate", str(tiny_model_dir), "--input", str(inp), "--dimensions", "64,16", "--output", str(out)]
    assert main([*args, "--sample", "30"]) == 0
    cal = Calibration.load(out)
    assert sorted(cal.ranges) == [16, 64] and cal.sample_size == 30
    # the ranges of the model's own embeddings of the sampled texts at each width
    model = Embedder.load(tiny_model_dir, device="cpu")
    emb = model.encode(texts, dimensions=16)
    low, high = cal.ranges[16]
    assert np.all(low >= emb.min(0) - 1e-5) and np.all(high <= emb.max(0) + 1e-5)
    all_texts = calibration_ranges(emb)
    assert np.all(low >= all_texts[0] - 1e-5) and np.all(high <= all_texts[1] + 1e-5)
    parsed = build_parser().parse_args(["serve", str(tiny_model_dir), "--calibration", str(out)])
    assert sorted(_serving_calibration(parsed, str(tiny_model_dir)).ranges) == [16, 64]
    # a model folder: written beside the model, found by `serve` without the flag
    assert main(["calibrate", str(tiny_model_dir), "--input", str(inp)]) == 0
    parsed = build_parser().parse_args(["serve", str(tiny_model_dir)])
    assert sorted(_serving_calibration(parsed, str(tiny_model_dir)).ranges) == [64]
    assert main(["calibrate", "all-MiniLM-L6-v2-not-a-folder", "--input", str(inp)]) == 2


def test_lora_modules_take_several_per_flag_or_the_flag_repeated():
    import pytest

    from embforge.cli import _adapter_modules, build_parser
    from embforge.errors import ConfigError

    repeated = ["serve", "base", "--lora-modules", "a=/x/a", "--lora-modules", "b=/x/b", "c=/x/c"]
    parsed = build_parser().parse_args(repeated)
    assert _adapter_modules(parsed.lora_modules) == {"a": "/x/a", "b": "/x/b", "c": "/x/c"}
    with pytest.raises(ConfigError, match="'a' is given twice"):
        _adapter_modules(["a=/x/a", "a=/x/other"])
    with pytest.raises(ConfigError, match="expected NAME=PATH"):
        _adapter_modules(["/x/a"])
    with pytest.raises(ConfigError, match="labels the metrics of mixed passes"):
        _adapter_modules(["(mixed)=/x/a"])
