"""Unpadded (packed, variable-length) encoders give the padded path's outputs and gradients."""

import json

import pytest
import torch

from embforge.modeling import packing
from embforge.modeling.embedding import backbone_forward, embed
from embforge.modeling.head import HeadSpec
from embforge.models.build import enable_gradient_checkpointing
from embforge.models.embedder import Embedder
from embforge.models.nomic_bert import build_backbone
from embforge.models.nomic_bert_config import from_name
from embforge.models.tiny import DECODER_FAMILIES, tiny_bert, tiny_decoder
from embforge.models.tokenizers import nomic_tokenizer

TEXTS = [
    "sort a list of python dict values by key",
    "a",
    "the cat runs fast",
    "find the matching file path in a text document search",
    "red blue green",
]


def tiny_nomic(seed: int = 0):
    torch.manual_seed(seed)
    spec = from_name("nomic-bert-2048", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    return build_backbone(spec)


def outputs_and_grads(model: Embedder, batch: dict, unpad: bool):
    """(embeddings (B, D), hidden states on real tokens (N, D), d(sum of embeddings·w)/d(params))."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = backbone_forward(
        model.backbone, batch["input_ids"], batch["attention_mask"], bidirectional=True, unpad=unpad
    )
    emb = embed(model.backbone, model.pooler, **batch, head=model.head, unpad=unpad)
    weights = torch.linspace(-1, 1, emb.shape[-1])
    grads = torch.autograd.grad((emb * weights).sum(), params)  # leaves no .grad on shared fixtures
    return emb.detach(), hidden[batch["attention_mask"].bool()].detach(), grads


def assert_paths_agree(model: Embedder, texts: list[str], atol: float = 1e-5) -> None:
    batch = model.tokenize(texts)
    assert not batch["attention_mask"].bool().all(), "the batch must have padding"
    emb_p, hid_p, grads_p = outputs_and_grads(model, batch, unpad=False)
    emb_u, hid_u, grads_u = outputs_and_grads(model, batch, unpad=True)
    torch.testing.assert_close(hid_u, hid_p, atol=atol, rtol=1e-5)
    torch.testing.assert_close(emb_u, emb_p, atol=atol, rtol=1e-5)
    assert len(grads_u) == len(grads_p) > 10
    for gu, gp in zip(grads_u, grads_p):
        torch.testing.assert_close(gu, gp, atol=atol, rtol=1e-4)


def test_tiny_bert_unpadded_equals_padded_in_train_mode():
    backbone, tokenizer = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Embedder(backbone, tokenizer, HeadSpec(max_seq_len=32)).train()
    assert_paths_agree(model, TEXTS)


def test_tiny_nomic_bert_unpadded_equals_padded_in_train_mode(minilm_dir):
    model = Embedder(
        tiny_nomic(), nomic_tokenizer(minilm_dir), HeadSpec(max_seq_len=64)
    ).train()  # no dropout: train = eval
    assert_paths_agree(model, TEXTS + ["search_query: " + " ".join(TEXTS)])


def test_packaged_minilm_unpadded_equals_padded(minilm, real_sentences):
    texts = sorted(real_sentences[:12], key=len)[::3] + real_sentences[12:14]  # lengths far apart
    assert_paths_agree(minilm, texts)  # eval mode: MiniLM's dropout off


def test_token_type_ids_are_packed_too():
    backbone, tokenizer = tiny_bert()
    packing.enable_packed_attention(backbone)
    batch = tokenizer(["the cat", "sort a list of files"], ["a dog", "b"], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].any()
    kwargs = dict(bidirectional=True, token_type_ids=batch["token_type_ids"])
    with torch.no_grad():
        padded = backbone_forward(backbone, batch["input_ids"], batch["attention_mask"], unpad=False, **kwargs)
        unpadded = backbone_forward(backbone, batch["input_ids"], batch["attention_mask"], unpad=True, **kwargs)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(unpadded[keep], padded[keep], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(unpadded[~keep]) == 0  # nothing computed at pad positions


def test_gradient_checkpointing_recomputes_the_unpadded_forward():
    backbone, tokenizer = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = Embedder(backbone, tokenizer, HeadSpec(max_seq_len=32)).train()
    backbone2, _ = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    enable_gradient_checkpointing(backbone2)
    ckpt = Embedder(backbone2, tokenizer, HeadSpec(max_seq_len=32)).train()
    batch = plain.tokenize(TEXTS)
    _, _, grads = outputs_and_grads(plain, batch, unpad=False)
    _, _, grads_ckpt = outputs_and_grads(ckpt, batch, unpad=True)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_auto_choice_and_unsupported_backbones():
    backbone, tokenizer = tiny_bert()
    assert not packing.supports_unpadding(backbone)  # SDPA until switched, when a model is built on it
    packing.enable_packed_attention(backbone)
    assert packing.supports_unpadding(backbone)
    decoder, _ = tiny_decoder("llama")
    packing.enable_packed_attention(decoder)
    assert packing.supports_unpadding(decoder)
    for eager in (tiny_decoder("llama", attn_implementation="eager")[0], tiny_bert(attn_implementation="eager")[0]):
        packing.enable_packed_attention(eager)  # eager attention stays eager: padded only
        assert not packing.supports_unpadding(eager)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="unpadded attention supports"):
        packing.unpadded_forward(eager, ids, torch.tensor([[1, 1, 0, 0]]))
    # encoders of other families keep the padded path, whatever the switch says
    model = Embedder(eager, tokenizer, HeadSpec(max_seq_len=32))
    assert model.encode(["the cat", "a"]).shape == (2, 64)


def test_saved_config_does_not_name_the_packed_attention(tmp_path):
    backbone, tokenizer = tiny_bert()
    model = Embedder(backbone, tokenizer, HeadSpec(max_seq_len=32))
    assert backbone.config._attn_implementation == packing.VARLEN_ATTENTION  # switched when the model was built
    before = model.encode(TEXTS)
    folder = model.save(tmp_path / "m")
    assert packing.VARLEN_ATTENTION not in (folder / "config.json").read_text()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    again = Embedder.load(folder, device="cpu")
    torch.testing.assert_close(torch.from_numpy(again.encode(TEXTS)), torch.from_numpy(before), atol=1e-6, rtol=0)


def test_nomic_bert_beyond_the_trained_length_each_text_gets_its_own_ntk_base(minilm_dir):
    torch.manual_seed(0)
    spec = from_name(
        "nomic-bert-2048",
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        max_trained_len=16,
        max_seq_len=128,
    )
    model = Embedder(build_backbone(spec), nomic_tokenizer(minilm_dir), HeadSpec(max_seq_len=128)).eval()
    texts = [" ".join(TEXTS * 4), TEXTS[0], " ".join(TEXTS[:2])]  # ~80 tokens (stretched), 10 and ~16 (not)
    assert_paths_agree(model, texts)
    # a long padded row before a short last one: the packed batch's pad rows (rounding its length
    # up) must not lengthen the last text
    for batch_texts in (texts, [" ".join(TEXTS * 4), " ".join(TEXTS * 6), TEXTS[2]]):
        batch = model.tokenize(batch_texts)
        for unpad in (False, True):
            together = embed(model.backbone, model.pooler, **batch, head=model.head, unpad=unpad).detach()
            for i, text in enumerate(batch_texts):  # no text's embedding depends on what it is batched with
                alone = embed(
                    model.backbone, model.pooler, **model.tokenize([text]), head=model.head, unpad=unpad
                ).detach()
                torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_length_is_rounded_up_with_pad_rows_that_unpack_real_drops():
    mask = torch.tensor([[1] * 30 + [0] * 20, [1] * 45 + [0] * 5, [1] * 10 + [0] * 40])  # 85 real of 150
    packed = packing.PackedBatch(mask, multiple=64)
    assert packed.num_real == 85 and len(packed.indices) == 128  # rounded up with 43 pad positions
    assert mask.flatten()[packed.indices[:85]].all() and not mask.flatten()[packed.indices[85:]].any()
    x = torch.arange(150.0).view(3, 50, 1)
    assert torch.equal(packed.unpack_real(packed.pack(x)), x * mask[..., None])  # real rows back, zeros at pads
    assert len(packing.PackedBatch(mask, multiple=1).indices) == 85
    assert len(packing.PackedBatch(mask[:, :42], multiple=64).indices) == 126  # 82 real: every pad used, short of 128


def test_length_buckets_cover_every_row_once_and_shrink_the_attention_area():
    lengths = [128] * 10 + [100, 97, 90, 64, 60, 33, 20, 12, 11, 10, 0]
    groups = packing.length_buckets(lengths, max_buckets=4)
    assert 1 < len(groups) <= 4
    rows = [r for g, _ in groups for r in g]
    assert sorted(rows) == [i for i, n in enumerate(lengths) if n > 0]  # every non-empty row exactly once
    assert all(max(lengths[r] for r in g) <= t <= 128 for g, t in groups)
    area = sum(len(g) * t * t for g, t in groups)
    assert area < 0.8 * 20 * 128**2  # one padded block: 20 rows x 128^2
    # two lengths, two buckets: exactly the lengths (rounded up to the grid of 8)
    assert packing.length_buckets([50, 9, 50, 9], max_buckets=2) == [([0, 2], 50), ([1, 3], 16)]
    assert packing.length_buckets([5, 5, 5], max_buckets=4) == [([0, 1, 2], 5)]  # capped at the longest
    assert packing.length_buckets([0, 0]) == []


def test_unpadded_equals_padded_when_every_row_has_its_own_length():
    backbone, tokenizer = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Embedder(backbone, tokenizer, HeadSpec(max_seq_len=64)).train()
    texts = [" ".join(["word"] * n) for n in (1, 3, 5, 8, 13, 21, 34, 55)]  # more lengths than buckets
    assert len(packing.PackedBatch(model.tokenize(texts)["attention_mask"]).buckets) == packing.ATTENTION_BUCKETS
    assert_paths_agree(model, texts)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_decoder_unpadded_equals_padded(family, attention, padding_side):
    """Grouped-query decoders (4 heads / 2 KV heads) packed: same states and gradients, either mask, either side."""
    backbone, tokenizer = tiny_decoder(family)
    model = Embedder(
        backbone,
        tokenizer,
        HeadSpec(max_seq_len=64, attention=attention, pooling={"name": "mean"}, padding_side=padding_side),
    ).train()
    texts = TEXTS + [" ".join(["word"] * n) for n in (8, 13, 21)]
    batch = model.tokenize(texts)
    assert len(packing.PackedBatch(batch["attention_mask"]).buckets) > 1
    bidirectional = attention == "bidirectional"
    hidden = {}
    for unpad in (False, True):
        states = backbone_forward(
            model.backbone, batch["input_ids"], batch["attention_mask"], bidirectional=bidirectional, unpad=unpad
        )
        hidden[unpad] = states[batch["attention_mask"].bool()]
        grads = torch.autograd.grad(hidden[unpad].square().sum(), list(model.backbone.parameters()))
        hidden[unpad, "grads"] = grads
    torch.testing.assert_close(hidden[True], hidden[False], atol=1e-5, rtol=1e-5)
    for gu, gp in zip(hidden[True, "grads"], hidden[False, "grads"]):
        torch.testing.assert_close(gu, gp, atol=1e-4 * gp.abs().max().item(), rtol=1e-4)  # fp32 summation order


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_decoder_batch_without_padding_after_a_packed_one(family, attention):
    """The backbone attends through packed attention from the start; a padded batch runs packed, and a
    later batch without padding takes the padded path on that backbone, with the same result as a fresh one."""
    backbone, tokenizer = tiny_decoder(family)
    model = Embedder(
        backbone, tokenizer, HeadSpec(max_seq_len=64, attention=attention, pooling={"name": "mean"})
    ).eval()
    text = ["find the matching file path"]
    with torch.no_grad():
        fresh = model.encode(text, precision="fp32")
        assert backbone.config._attn_implementation == packing.VARLEN_ATTENTION
        model.encode(TEXTS, precision="fp32")  # padded -> packed
        again = model.encode(text, precision="fp32")  # one text, no padding: the padded path
    torch.testing.assert_close(torch.as_tensor(again), torch.as_tensor(fresh), atol=1e-6, rtol=1e-6)
