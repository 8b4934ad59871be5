"""8,192-token inference of a tiny nomic-bert (dynamic NTK beyond the trained 2,048 tokens)."""

import numpy as np
import torch

from embforge.modeling.head import HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.nomic_bert import build_backbone
from embforge.models.nomic_bert_config import from_name
from embforge.models.tokenizers import nomic_tokenizer


def test_tiny_nomic_bert_encodes_8192_tokens(minilm_dir):
    torch.manual_seed(0)
    spec = from_name("nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    assert (spec.max_trained_len, spec.max_seq_len, spec.rope_scaling_factor) == (2048, 8192, 2.0)
    model = Embedder(build_backbone(spec), nomic_tokenizer(minilm_dir), HeadSpec(max_seq_len=spec.max_seq_len)).eval()
    words = ("sort a list of the files by their size and read the data back " * 1000).split()
    long_text, short_text = " ".join(words[:9000]), " ".join(words[:1000])
    assert model.tokenize([long_text])["input_ids"].shape == (1, 8192)  # truncated to the context, not below
    both = model.encode([long_text, short_text])  # one padded batch: 8,192 and ~1,000 tokens
    assert np.isfinite(both).all()
    # the short text's embedding does not depend on being batched with an 8k one (unpadded, own positions)
    np.testing.assert_allclose(both[1], model.encode([short_text])[0], atol=1e-5)
    # beyond 2,048 tokens the rotary base is stretched (dynamic NTK): the same positions rotate differently
    rotary = model.backbone.rotary_emb
    x = torch.zeros(1, 8192, 16)
    cos_long, _ = rotary(x, torch.arange(8192)[None])
    cos_short, _ = rotary(x[:, :2048], torch.arange(2048)[None])
    # up to the trained length: the plain rotary, cos(position x base^(-2i/d)) with base 1000, unscaled
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, 16, 2).float() / 16)  # (d/2,)
    angles = torch.arange(2048).float()[:, None] * inv_freq  # (T, d/2)
    plain = torch.cat([angles, angles], dim=-1).cos()[None]  # (1, T, d): rotate-half layout
    torch.testing.assert_close(cos_short, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(cos_long[:, :2048], cos_short, atol=1e-2)
