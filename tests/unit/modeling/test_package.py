"""The modeling package is self-contained: saved folders load and embed in a process where embforge cannot be imported."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import embforge.modeling
from embforge.modeling.head import HeadSpec
from embforge.models.build import apply_lora
from embforge.models.embedder import Embedder
from embforge.models.nomic_bert import build_backbone
from embforge.models.nomic_bert_config import from_name
from embforge.models.spec import LoraConfig
from embforge.models.tiny import tiny_nv_embedder
from embforge.models.tokenizers import nomic_tokenizer

PACKAGE = Path(embforge.modeling.__file__).parent
FILES = embforge.modeling.MODELING_FILES
ALLOWED = {"torch", "transformers"}
TEXTS = ["sort a list of data", "open the file", "the cat runs fast " * 30]


def _imports(path: Path):
    """(absolute top-level module names, relative module names, imports at module level) of a file."""
    tree = ast.parse(path.read_text())
    absolute, relative, top = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module.split(".")[0] if node.module else "")
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top.add(node.module.split(".")[0])
    return absolute, relative, top


def test_every_file_of_the_package_is_copied():
    assert sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py") == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_files_import_only_the_standard_library_torch_transformers_and_each_other(name):
    absolute, relative, top = _imports(PACKAGE / name)
    outside = {m for m in absolute if m not in sys.stdlib_module_names and m not in ALLOWED and m != "__future__"}
    assert not outside, f"{name} imports {sorted(outside)}"
    assert {f"{m}.py" for m in relative} <= set(FILES), f"{name}: relative imports outside the package"
    if name == "tokenization.py":  # the ONNX path imports it without torch: torch only inside a function
        assert not top & ALLOWED, f"tokenization.py imports {sorted(top & ALLOWED)} at module level"
    assert len((PACKAGE / name).read_text().splitlines()) <= 400, f"{name} is over 400 lines"


def test_the_onnx_path_imports_the_tokeniser_without_torch():
    code = "import sys; import embforge.modeling.tokenization, embforge.onnx.runtime; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


_OUTSIDE = r"""
import json, sys
sys.modules["embforge"] = None  # `import embforge` now fails: only the folder's own files can run
import numpy as np, torch
from sentence_transformers import SentenceTransformer
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

folder, texts, prompt_name, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] or None, sys.argv[4]
try:
    import embforge  # noqa: F401
    raise SystemExit("embforge is importable")
except ImportError:
    pass
st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
registered = (set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))
impl = model.backbone.config._attn_implementation
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    hf = model(**model.tokenize(tokenizer, texts, prompt_name=prompt_name)).embeddings.numpy()
st_emb = st.encode(texts, prompt_name=prompt_name, batch_size=2)
after = (set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))
assert after == registered, "a forward pass registered something with transformers"
assert model.backbone.config._attn_implementation == impl, "a forward pass switched the attention"
assert any(k.startswith("embforge_varlen_") for k in registered[0]), sorted(registered[0])
np.save(out, np.stack([hf, st_emb]))
"""


def nv_style() -> Embedder:
    return tiny_nv_embedder(prompts={"query": "instruct: find a file\nquery: "}, max_seq_len=48)


def nomic_with_ntk(minilm_dir) -> Embedder:
    torch.manual_seed(0)
    # trained at 16 tokens: the longer texts get a stretched rotary base
    spec = from_name(
        "nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, max_trained_len=16
    )
    return Embedder(
        build_backbone(spec),
        nomic_tokenizer(minilm_dir),
        HeadSpec(max_seq_len=128, prompts={"query": "search_query: "}),
    )


def nv_with_adapter() -> Embedder:
    """nv_style with a LoRA adapter whose B is not zero, so that leaving it out would show."""
    model = nv_style()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for key, p in model.backbone.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("kind", ["nv-style", "nomic-ntk", "nv-adapter"])
def test_a_saved_folder_embeds_with_sentence_transformers_and_automodel_without_embforge(kind, minilm_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    if kind == "nv-adapter":
        pytest.importorskip("peft")
    builders = {"nv-style": nv_style, "nomic-ntk": lambda: nomic_with_ntk(minilm_dir), "nv-adapter": nv_with_adapter}
    model = builders[kind]()
    folder = model.save(tmp_path / kind, merge_lora=kind != "nv-adapter")
    assert (folder / "adapter").is_dir() == (kind == "nv-adapter")  # kept apart: the folder merges it on load
    assert all((folder / name).read_bytes() == (PACKAGE / name).read_bytes() for name in FILES)  # copied whole
    out = tmp_path / "out.npy"
    subprocess.run(
        [sys.executable, "-c", _OUTSIDE, str(folder), json.dumps(TEXTS), "query", str(out)],
        check=True,
        cwd=tmp_path,
    )
    expected = model.encode(TEXTS, prompt_name="query", precision="fp32")
    for got in np.load(out):  # transformers, then sentence-transformers
        assert (got * expected).sum(1).min() >= 0.99999
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sentence_transformers_too_old_to_pass_prompts_apart_is_refused(monkeypatch):
    from embforge.modeling import modeling_embforge

    monkeypatch.setattr(modeling_embforge, "_version", lambda name: (5, 1))
    with pytest.raises(ImportError, match=r"sentence-transformers>=6\.3 \(found 5\.1\)"):
        modeling_embforge.EmbforgeSTModule("never-read")
