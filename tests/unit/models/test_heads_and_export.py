"""Trainable heads, LoRA, the meta device, and the saved folder in transformers / sentence-transformers."""

import numpy as np
import pytest
import torch

from embforge.modeling.head import HeadSpec
from embforge.modeling.pooling import AttentionPooling, num_parameters
from embforge.models.build import build_embedder
from embforge.models.embedder import Embedder
from embforge.models.spec import LoraConfig, ModelConfig, PoolingConfig
from embforge.models.tiny import tiny_decoder, tiny_nv_embedder

TEXTS = ["sort a list", "open the file and read data", "the cat runs fast"]
INSTRUCT = "instruct: find a file\nquery: "


def test_nv_embed_head_and_full_model_parameter_counts_on_meta():
    with torch.device("meta"):  # 3 GB of weights on CPU: count them without allocating
        head = AttentionPooling(4096, num_latents=512, num_heads=8, head_dim=4096)
    assert num_parameters(head) == 740_356_096
    model = build_embedder(ModelConfig(name_or_path="mistral-7b", pooling=PoolingConfig(name="latent")), device="meta")
    assert num_parameters(model.pooler) == 740_356_096
    assert num_parameters(model) == 7_851_016_192  # Mistral-7B without lm_head + the NV head
    assert all(p.is_meta for p in model.parameters())  # nothing allocated


def test_lora_trains_only_adapters_and_the_head(tmp_path):
    backbone, tokenizer = tiny_decoder("mistral")
    start = Embedder(backbone, tokenizer, HeadSpec(pooling={"name": "latent", "num_latents": 8, "head_dim": 16})).save(
        tmp_path / "start"
    )
    spec = ModelConfig(name_or_path=str(start), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    model = build_embedder(spec).train()
    with torch.no_grad():  # LoRA starts with B = 0, where A gets exactly zero gradient: step away from it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = model.tokenize(TEXTS)
    model(**batch).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all("lora_" in n or n.startswith("pooler.") for n in trainable)
    assert any(n.startswith("pooler.") for n in trainable) and any("lora_A" in n for n in trainable)


@pytest.fixture(scope="module")
def nv_style(tmp_path_factory):
    """A tiny NV-Embed-style model with trained-looking LoRA (non-zero B) and a latent head."""
    start = tiny_nv_embedder(prompts={"query": INSTRUCT}, instruction_template="instruct: {instruction}\nquery: ").save(
        tmp_path_factory.mktemp("nv") / "start"
    )
    model = build_embedder(ModelConfig(name_or_path=str(start), lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a fresh adapter is a no-op: make it count
    return model


def test_save_load_round_trip_merged_and_kept_adapter(nv_style, tmp_path):
    expected = nv_style.encode(TEXTS, prompt_name="query", precision="fp32")
    for merge in (True, False):
        folder = nv_style.save(tmp_path / f"m{merge}", merge_lora=merge)
        assert (folder / "adapter").is_dir() != merge
        loaded = Embedder.load(folder, device="cpu")
        assert loaded.head.instruction_template == nv_style.head.instruction_template and not loaded.head.pool_prompt
        assert np.allclose(loaded.encode(TEXTS, prompt_name="query", precision="fp32"), expected, atol=1e-5), merge


def test_an_adapter_folder_trains_on_with_a_matching_lora_and_merges_in_without_one(nv_style, tmp_path):
    from embforge.errors import ConfigError

    folder = str(nv_style.save(tmp_path / "kept", merge_lora=False))
    expected = nv_style.encode(TEXTS, prompt_name="query", precision="fp32")

    # the recipe's dropout (no weight depends on it) replaces the folder's; rank, alpha, targets must match
    on = build_embedder(ModelConfig(name_or_path=folder, lora=LoraConfig(r=4, alpha=8, dropout=0.25)))
    dropouts = [m.lora_dropout["default"] for m in on.backbone.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in dropouts)
    with pytest.raises(ConfigError, match="r: the folder's 4, the recipe's 8"):
        build_embedder(ModelConfig(name_or_path=folder, lora=LoraConfig(r=8, alpha=8)))

    # no lora: in the recipe: the adapter is merged into the weights (float32) and every weight trains
    full = build_embedder(ModelConfig(name_or_path=folder))
    assert not any("lora_" in n for n, _ in full.named_parameters())
    assert all(p.requires_grad for p in full.parameters())
    assert np.allclose(full.encode(TEXTS, prompt_name="query", precision="fp32"), expected, atol=1e-5)


def test_exported_folder_loads_in_transformers_and_sentence_transformers(nv_style, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel

    folder = str(nv_style.save(tmp_path / "export"))
    for prompt_name in (None, "query"):
        ours = nv_style.encode(TEXTS, prompt_name=prompt_name)
        hf = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        batch = nv_style.tokenize(TEXTS, prompt_name=prompt_name)
        with torch.no_grad():
            theirs = hf(**batch).embeddings.numpy()
        assert (ours * theirs).sum(1).min() >= 0.9999
        sentence = st.SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        theirs = sentence.encode(TEXTS, prompt_name=prompt_name)
        assert (ours * theirs).sum(1).min() >= 0.9999, prompt_name
