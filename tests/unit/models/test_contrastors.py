"""The released contrastors layout loads into the native model and round-trips both ways."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from embforge.errors import CheckpointError, ConfigError
from embforge.modeling.rotary import DynamicNTKRotaryEmbedding
from embforge.models.contrastors import is_contrastors_folder, load_contrastors_backbone, save_contrastors
from embforge.models.nomic_bert import build_backbone
from embforge.models.nomic_bert_config import from_name
from embforge.models.tiny import tiny_bert

D, LAYERS, HEADS, INNER, VOCAB = 64, 2, 4, 256, 150  # contrastors rounds n_inner to a multiple of 256
CONFIG = {
    "model_type": "nomic_bert",
    "architectures": ["NomicBertModel"],
    "auto_map": {"AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
    "activation_function": "swiglu",
    "n_embd": D,
    "n_layer": LAYERS,
    "n_head": HEADS,
    "n_inner": INNER,
    "n_positions": 8192,
    "max_trained_positions": 2048,
    "rotary_emb_base": 1000,
    "rotary_emb_fraction": 1.0,
    "rotary_scaling_factor": None,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "prenorm": False,
    "layer_norm_epsilon": 1e-12,
    "type_vocab_size": 2,
    "vocab_size": VOCAB,
    "pad_vocab_size_multiple": 64,
    "attn_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "use_flash_attn": True,
    "fused_bias_fc": True,
    "causal": False,
}
PADDED_VOCAB = 192


def contrastors_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Exactly the released names and shapes (random values)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "embeddings.word_embeddings.weight": r(PADDED_VOCAB, D, scale=1.0),
        "embeddings.token_type_embeddings.weight": r(2, D),
        "emb_ln.weight": 1 + r(D),
        "emb_ln.bias": r(D),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        sd[p + "attn.Wqkv.weight"] = r(3 * D, D, scale=0.3)  # q, k, v stacked
        sd[p + "attn.out_proj.weight"] = r(D, D)
        sd[p + "mlp.fc11.weight"] = r(INNER, D)
        sd[p + "mlp.fc12.weight"] = r(INNER, D)
        sd[p + "mlp.fc2.weight"] = r(D, INNER)
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(D), r(D)
    return sd


def write_folder(path, config=None, weights=None, file="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    weights = weights if weights is not None else contrastors_weights()
    if file.endswith(".bin"):
        torch.save(weights, path / file)  # nomic-embed-text-v1 also ships pytorch_model.bin
    else:
        save_file(weights, str(path / file))
    return path


def reference_forward(sd: dict, input_ids: torch.Tensor, base: float = 1000.0) -> torch.Tensor:
    """contrastors' NomicBertModel semantics, written out on the raw tensors (no transformers)."""
    B, T = input_ids.shape
    hd = D // HEADS

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    x = ln(
        sd["embeddings.word_embeddings.weight"][input_ids] + sd["embeddings.token_type_embeddings.weight"][0], "emb_ln"
    )
    angles = torch.outer(torch.arange(T).float(), 1.0 / base ** (torch.arange(0, hd, 2).float() / hd))  # (T, hd/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # (1, T, 1, hd/2)

    def rotate(t):  # (B, T, H, hd), GPT-NeoX (not interleaved) layout
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        q, k, v = (x @ sd[p + "attn.Wqkv.weight"].T).view(B, T, 3, HEADS, hd).unbind(2)  # (B, T, H, hd) each
        att = torch.einsum("bthd,bshd->bhts", rotate(q), rotate(k)) / hd**0.5  # (B, H, T, T)
        o = torch.einsum("bhts,bshd->bthd", att.softmax(-1), v).reshape(B, T, D)
        x = ln(x + o @ sd[p + "attn.out_proj.weight"].T, p + "norm1")
        y = (x @ sd[p + "mlp.fc11.weight"].T) * F.silu(x @ sd[p + "mlp.fc12.weight"].T)  # fc11 = up, fc12 = gate
        x = ln(x + y @ sd[p + "mlp.fc2.weight"].T, p + "norm2")
    return x


def ids(batch=2, length=19, seed=3):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, x):
    with torch.no_grad():
        return model(input_ids=x).last_hidden_state


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_synthetic_release_folder_loads_without_remote_code(tmp_path, file):
    folder = write_folder(tmp_path / "nomic", file=file)
    assert is_contrastors_folder(folder)
    model, tokenizer = load_contrastors_backbone(folder)
    assert tokenizer is None  # no tokenizer files in this folder
    assert model.embeddings.word_embeddings.weight.shape == (PADDED_VOCAB, D)  # 150 padded to a multiple of 64
    x = ids()
    torch.testing.assert_close(run(model, x), reference_forward(contrastors_weights(), x), atol=2e-5, rtol=1e-5)


def test_round_trip_contrastors_to_native_to_contrastors(tmp_path):
    folder = write_folder(tmp_path / "nomic")
    _, tokenizer = tiny_bert()
    tokenizer.save_pretrained(folder)
    model, tok = load_contrastors_backbone(folder)
    assert tok is not None and tok.vocab == tokenizer.vocab
    out = save_contrastors(model, tmp_path / "again", tok, max_seq_len=8192)
    written, original = load_file(str(out / "model.safetensors")), contrastors_weights()
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in CONFIG if k not in ("auto_map", "use_flash_attn", "fused_bias_fc")} == {
        **{k: v for k, v in CONFIG.items() if k not in ("auto_map", "use_flash_attn", "fused_bias_fc")},
        "vocab_size": PADDED_VOCAB,
    }
    assert is_contrastors_folder(out)
    again, _ = load_contrastors_backbone(out)
    x = ids()
    assert torch.equal(run(again, x), run(model, x))


def test_round_trip_native_to_contrastors_to_native(tmp_path):
    torch.manual_seed(0)
    spec = from_name(
        "nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, vocab_size=192
    )
    native = build_backbone(spec).eval()
    save_contrastors(native, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["rotary_scaling_factor"] == 2.0
    loaded, _ = load_contrastors_backbone(tmp_path / "c")
    assert isinstance(loaded.rotary_emb, DynamicNTKRotaryEmbedding)
    assert loaded.config.rope_parameters == native.config.rope_parameters
    for length in (19, 3000):  # below and beyond the trained length (dynamic NTK)
        x = ids(1, length)
        assert torch.equal(run(loaded, x), run(native, x))
    native.save_pretrained(tmp_path / "n")  # a native folder is not the contrastors layout
    assert not is_contrastors_folder(tmp_path / "n") and not is_contrastors_folder(tmp_path / "missing")


def test_rotary_scaling_factor_override_and_mlm_checkpoint_prefix(tmp_path):
    weights = {"bert." + k: v for k, v in contrastors_weights().items()}
    weights["cls.predictions.transform.dense.weight"] = torch.zeros(D, D)  # the MLM head is skipped
    folder = write_folder(tmp_path / "mlm", weights=weights)
    model, _ = load_contrastors_backbone(folder, rope_scaling_factor=2.0)
    assert model.config.rope_parameters["rope_type"] == "dynamic" and model.config.max_position_embeddings == 2048
    x = ids()
    torch.testing.assert_close(run(model, x), reference_forward(contrastors_weights(), x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("prenorm", True, "prenorm=True is not supported"),
        ("qkv_proj_bias", True, "qkv_proj_bias=True is not supported"),
        ("rotary_emb_fraction", 0.5, "rotary_emb_fraction=0.5 is not supported"),
        ("activation_function", "gelu", "activation_function='gelu' is not supported"),
    ],
)
def test_unsupported_configs_are_named(tmp_path, key, value, message):
    folder = write_folder(tmp_path / "bad", config={**CONFIG, key: value})
    with pytest.raises(ConfigError, match=message):
        load_contrastors_backbone(folder)


def test_unknown_config_keys_are_reported_not_dropped_silently(tmp_path):
    folder = write_folder(tmp_path / "extra", config={**CONFIG, "my_new_switch": True})
    with pytest.warns(UserWarning, match=r"ignoring config keys embforge does not know: \['my_new_switch'\]"):
        load_contrastors_backbone(folder)


def test_weight_problems_are_named(tmp_path):
    weights = contrastors_weights()
    del weights["encoder.layers.1.mlp.fc12.weight"]
    with pytest.raises(CheckpointError, match=r"missing: \['layers.1.mlp.gate_proj.weight'\]"):
        load_contrastors_backbone(write_folder(tmp_path / "a", weights=weights))
    weights = contrastors_weights()
    weights["encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_contrastors_backbone(write_folder(tmp_path / "b", weights=weights))
    with pytest.raises(CheckpointError, match="cannot load|wrong shape"):
        load_contrastors_backbone(write_folder(tmp_path / "c", config={**CONFIG, "n_inner": 512}))
    with pytest.raises(ConfigError, match="multiple of 256"):
        save_contrastors(
            build_backbone(
                from_name(
                    "nomic-bert-2048", num_layers=1, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=64
                )
            ),
            tmp_path / "d",
        )


def test_embedder_loads_a_released_layout_folder_with_its_sentence_transformers_files(tmp_path, tiny_embedder):
    """nomic-embed-text folders: contrastors weights + sentence-transformers files (mean pooling, prompts)."""
    from embforge.models.embedder import Embedder

    folder = write_folder(tmp_path / "nomic")
    tiny_embedder.tokenizer.save_pretrained(folder)  # any WordPiece tokenizer whose ids fit the vocabulary
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "search_query: ", "document": "search_document: "}})
    )
    model = Embedder.load(folder, device="cpu")
    assert model.head.prompts["query"] == "search_query: " and model.backbone.config.model_type == "nomic_bert"
    batch = model.tokenize(["the cat runs", "sort a list of data"])
    expected = reference_forward(contrastors_weights(), batch["input_ids"][:1, :5])  # "[CLS] the cat runs [SEP]"
    mean = expected.mean(1)
    torch.testing.assert_close(
        torch.tensor(model.encode(["the cat runs"], precision="fp32")),
        torch.nn.functional.normalize(mean, dim=-1),
        atol=2e-5,
        rtol=1e-5,
    )
