"""nomic-bert: the paper's architecture on transformers' native model, plus what it lacks."""

import subprocess
import sys

import pytest
import torch
from transformers import NomicBertForMaskedLM
from transformers.models.nomic_bert.modeling_nomic_bert import apply_rotary_pos_emb

from embforge.errors import ConfigError
from embforge.modeling.pooling import num_parameters
from embforge.modeling.rotary import DynamicNTKRotaryEmbedding
from embforge.models.nomic_bert import (
    NomicBertForMLM,
    build_backbone,
    hf_config,
)
from embforge.models.nomic_bert_config import from_name, pad_vocab_size
from embforge.models.tokenizers import nomic_tokenizer

TINY = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=192)


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_backbone(from_name("nomic-bert-2048", **{**TINY, **overrides})).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 192, (batch, length), generator=torch.Generator().manual_seed(seed))


def hidden(model, input_ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kw).last_hidden_state


# ----------------------------------------------------------------------------- presets
def test_preset_parameter_counts_on_meta():
    spec = from_name("nomic-bert-2048")
    backbone = build_backbone(spec, device="meta")
    with torch.device("meta"):
        mlm = NomicBertForMLM(backbone)
    assert all(p.is_meta for p in mlm.parameters())  # nothing allocated
    assert num_parameters(backbone) == 136_731_648
    assert num_parameters(mlm) == 137_323_008  # + dense 768² + LayerNorm 2·768; decoder tied, no bias
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.intermediate_size) == (12, 768, 12, 3072)


def test_presets_import_without_torch():
    code = "import sys, embforge.models.nomic_bert_config as c; c.from_name('nomic-bert-2048'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_from_name_overrides_are_checked():
    assert from_name("nomic-bert-2048", num_layers=2).num_layers == 2
    with pytest.raises(ConfigError, match=r"unknown nomic-bert field 'num_layer' \(did you mean 'num_layers'\?\)"):
        from_name("nomic-bert-2048", num_layer=2)
    with pytest.raises(ConfigError, match="unknown nomic-bert preset"):
        from_name("nomic-bert-4096")
    with pytest.raises(ConfigError, match="heads of even size"):
        from_name("nomic-bert-2048", hidden_size=60, num_heads=4)


def test_paper_architecture_on_the_native_model():
    model = tiny()
    cfg = model.config
    assert cfg.rope_parameters["rope_theta"] == 1000.0 and cfg.layer_norm_eps == 1e-12
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    layer = model.layers[0]
    for lin in (*[getattr(layer.self_attn, n) for n in "q_proj k_proj v_proj o_proj".split()], layer.mlp.up_proj):
        assert lin.bias is None
    assert layer.mlp.gate_proj.bias is None and layer.mlp.down_proj.bias is None
    assert model.pooler is None


# ----------------------------------------------------------------------------- vocabulary
def test_vocabulary_padding_to_a_multiple_of_64(minilm_dir):
    assert pad_vocab_size(30522) == 30528 and pad_vocab_size(64) == 64 and pad_vocab_size(65) == 128
    spec = from_name("nomic-bert-2048")
    assert spec.vocab_size == 30528 and spec.vocab_size % 64 == 0
    assert build_backbone(spec, device="meta").embeddings.word_embeddings.weight.shape == (30528, 768)
    tokenizer = nomic_tokenizer(minilm_dir)
    assert len(tokenizer) == 30522 <= spec.vocab_size
    # bert-base-uncased: lower-cased WordPiece with its special-token ids
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 100, 101]
    assert [tokenizer.sep_token_id, tokenizer.mask_token_id] == [102, 103]
    assert tokenizer.tokenize("Hello World") == ["hello", "world"]


# ----------------------------------------------------------------------------- behaviour
def test_train_mode_is_deterministic_without_dropout():
    model = tiny().train()
    mlm = NomicBertForMLM(model).train()
    x = ids(2, 24)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state)
        assert torch.equal(mlm(x), mlm(x))
    model.eval()
    assert torch.equal(hidden(model, x), hidden(model.train(), x))


def test_rotary_shift_leaves_attention_scores_unchanged():
    model = tiny()
    q, k = torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 16)  # (B, H, T, hd)
    pos = torch.arange(20)[None]
    scores = []
    for shift in (0, 37):
        cos, sin = model.rotary_emb(q, pos + shift)
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
        scores.append(qr @ kr.transpose(-1, -2))  # (B, H, T, T)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(scores[0], q @ k.transpose(-1, -2), atol=1e-2)  # the rotation does act
    x = ids(2, 20)
    torch.testing.assert_close(hidden(model, x), hidden(model, x, position_ids=pos + 37), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dynamic NTK
def test_ntk_is_bit_identical_at_or_below_the_trained_length():
    scaled = tiny(max_trained_len=64, max_seq_len=256)
    plain = tiny(max_trained_len=64, max_seq_len=64, rope_scaling_factor=None)
    plain.load_state_dict(scaled.state_dict())
    assert isinstance(scaled.rotary_emb, DynamicNTKRotaryEmbedding)
    assert not isinstance(plain.rotary_emb, DynamicNTKRotaryEmbedding)
    short, full, long = ids(2, 17), ids(2, 64), ids(2, 256)
    assert torch.equal(hidden(scaled, short), hidden(plain, short))
    assert torch.equal(hidden(scaled, full), hidden(plain, full))
    hidden(scaled, long)  # no state: a long input before does not change later short ones
    assert torch.equal(hidden(scaled, full), hidden(plain, full))


def test_ntk_matches_the_formula_and_transformers_beyond_the_trained_length():
    model = tiny(max_trained_len=64, max_seq_len=256)
    x = ids(2, 256)
    # transformers' own (stateful) dynamic rope, freshly built, on the same weights
    from transformers import NomicBertModel

    native = NomicBertModel(model.config, add_pooling_layer=False).eval()
    native.load_state_dict(model.state_dict())
    assert type(native.rotary_emb) is not DynamicNTKRotaryEmbedding
    pos = torch.arange(256)[None]
    ours, theirs = model.rotary_emb(torch.zeros(1), pos), native.rotary_emb(torch.zeros(1), pos)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    out = hidden(model, x)
    assert torch.equal(out, hidden(native, x))
    assert torch.isfinite(out).all()  # 4x the trained length
    plain = tiny(max_trained_len=64, max_seq_len=64, rope_scaling_factor=None)
    assert not torch.allclose(ours[0], plain.rotary_emb(torch.zeros(1), pos)[0], atol=1e-2)  # the scaling acts
    # base' = base * (s*L/L_max - (s-1)) ** (d/(d-2)), s = 2, L = 256, L_max = 64, d = 16
    d = 16
    base = 1000.0 * (2 * 256 / 64 - 1) ** (d / (d - 2))
    expected = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, _ = model.rotary_emb(torch.zeros(1), torch.arange(256)[None])
    torch.testing.assert_close(cos[0, 1, : d // 2].double(), torch.cos(expected), atol=1e-6, rtol=1e-6)


def test_ntk_length_is_per_row():
    model = tiny(max_trained_len=64, max_seq_len=256)
    short = torch.arange(100).clamp(max=39)[None]  # a 40-token row padded to 100 (positions clamped)
    long = torch.arange(100)[None]
    cos, sin = model.rotary_emb(torch.zeros(1), torch.cat([short, long]))
    cos_short, _ = model.rotary_emb(torch.zeros(1), torch.arange(40)[None])
    assert torch.equal(cos[0, :40], cos_short[0])  # unscaled, though its batch mate is long
    cos_long, _ = model.rotary_emb(torch.zeros(1), long)
    assert torch.equal(cos[1], cos_long[0])


# ----------------------------------------------------------------------------- MLM head
def test_mlm_head_matches_native_masked_lm_with_zero_biases():
    backbone = tiny()
    mlm = NomicBertForMLM(backbone).eval()
    torch.nn.init.normal_(mlm.head.layer_norm.weight)
    native = NomicBertForMaskedLM(hf_config(from_name("nomic-bert-2048", **TINY))).eval()
    native.nomic_bert.load_state_dict(backbone.state_dict())
    head = native.cls.predictions
    with torch.no_grad():
        head.transform.dense.weight.copy_(mlm.head.dense.weight)
        head.transform.dense.bias.zero_()
        head.transform.layer_norm.load_state_dict(mlm.head.layer_norm.state_dict())
        head.bias.zero_()
        head.decoder.bias.zero_()
    assert head.decoder.weight.data_ptr() == native.nomic_bert.embeddings.word_embeddings.weight.data_ptr()
    x = ids(2, 12)
    with torch.no_grad():
        ours, theirs = mlm(x), native(input_ids=x).logits  # (B, T, V)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        where = torch.zeros_like(x, dtype=torch.bool)
        where[0, 3] = where[1, 7] = True
        torch.testing.assert_close(mlm(x, positions=where), ours[where], atol=1e-6, rtol=1e-5)  # (M, V)


def test_one_preset_table_holds_every_backbone_family():
    from embforge.models.presets import BACKBONE_PRESETS, backbone_preset, preset_config

    assert {p.family for p in BACKBONE_PRESETS.values()} == {"transformers", "nomic_bert"}
    assert backbone_preset("nomic-bert-2048").family == "nomic_bert" and from_name("nomic-bert-2048").num_layers == 12
    with pytest.raises(ConfigError, match="unknown nomic-bert preset 'mistral-7b'"):
        from_name("mistral-7b")  # in the table, but not a nomic-bert
    with pytest.raises(ConfigError, match="unknown transformers preset 'nomic-bert-2048'"):
        preset_config("nomic-bert-2048")
    with pytest.raises(ConfigError, match=r"unknown backbone preset 'mistral-7'.*did you mean 'mistral-7b'"):
        backbone_preset("mistral-7")
