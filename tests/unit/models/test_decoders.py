"""Decoder LLMs as embedding models: the causal mask removed (or kept), padding, instruction spans."""

import pytest
import torch

from embforge.modeling.embedding import backbone_forward
from embforge.modeling.head import HeadSpec
from embforge.modeling.tokenization import TextEncoder, TokenizerSettings
from embforge.models.embedder import Embedder
from embforge.models.tiny import DECODER_FAMILIES, tiny_decoder

LATENT = {"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16}
INSTRUCT = "instruct: find a file\nquery: "
TEXTS = ["sort a list", "open the file and read data", "the cat runs fast", "a"]


def _embedder(family, attention="bidirectional", impl="sdpa", padding_side="right", pooling=LATENT):
    torch.manual_seed(0)
    backbone, tokenizer = tiny_decoder(family, attn_implementation=impl)
    return Embedder(
        backbone,
        tokenizer,
        HeadSpec(
            pooling=pooling,
            attention=attention,
            pool_prompt=False,
            padding_side=padding_side,
            prompts={"query": INSTRUCT},
        ),
    ).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_later_token_changes_earlier_state_only_without_the_causal_mask(family, impl):
    for attention, expect_change in [("bidirectional", True), ("causal", False)]:
        model = _embedder(family, attention, impl)
        ids = model.tokenize(["sort a list of data"])
        changed = ids["input_ids"].clone()
        changed[0, -2] = (changed[0, -2] + 7) % model.tokenizer.vocab_size  # a later token
        with torch.no_grad():
            a, b = (
                backbone_forward(model.backbone, x, ids["attention_mask"], bidirectional=attention == "bidirectional")
                for x in (ids["input_ids"], changed)
            )
        first_changed = not torch.allclose(a[0, 1], b[0, 1], atol=1e-6)  # an earlier token's state
        assert first_changed == expect_change, (family, impl, attention)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_left_right_padding_and_pad_amount_do_not_change_embeddings(family):
    right = _embedder(family, padding_side="right")
    left = _embedder(family, padding_side="left")
    expected = torch.tensor(right.encode(TEXTS, prompt_name="query", batch_size=1, precision="fp32"))
    for model in (right, left):
        # batch_size 4: the short texts are padded by different amounts
        got = torch.tensor(model.encode(TEXTS, prompt_name="query", batch_size=4, precision="fp32"))
        assert torch.allclose(got, expected, atol=1e-5), model.tokenizer.padding_side
        batch = model.tokenize(TEXTS, prompt_name="query")
        with torch.no_grad():
            assert torch.allclose(model(**batch), expected, atol=1e-5)


def test_instruction_span_matches_a_hand_computation_for_both_padding_sides():
    _, tokenizer = tiny_decoder("llama")
    texts = ["sort a list", "cat"]

    def encoder(side):
        settings = TokenizerSettings(
            max_len=64, pad_id=0, padding_side=side, add_eos=True, eos_id=tokenizer.sep_token_id, pool_prompt=False
        )
        return TextEncoder(tokenizer, settings)

    rows = encoder("right").encode(texts, [INSTRUCT, ""])
    ids, excluded = [r.ids for r in rows], [r.excluded for r in rows]
    # by hand: [CLS] + the WordPiece tokens of the instruction; the document has no instruction
    instruction_tokens = tokenizer.tokenize(INSTRUCT)  # "instruct", ":", "find", "a", "file", "query", ":"
    assert excluded == [1 + len(instruction_tokens), 0]
    assert ids[0][excluded[0] :] == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("sort a list")) + [
        tokenizer.sep_token_id
    ]
    for side in ("right", "left"):
        batch = encoder(side).pad(rows).to_torch()
        pooled = [
            batch["input_ids"][i][batch["pooling_mask"][i].bool()].tolist() for i in range(len(texts))
        ]  # the tokens that are pooled, wherever the padding went
        assert pooled[0] == ids[0][excluded[0] :]
        assert pooled[1] == ids[1]  # no instruction: everything, BOS included
        assert batch["pooling_mask"].sum().item() == len(ids[0]) - excluded[0] + len(ids[1])


def test_a_token_straddling_the_prompt_boundary_is_content():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    # like a byte-level BPE, a word's token carries the space before it: "Query: x how" -> "Query:", " x", " how"
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "Query:": 1, " x": 2, " how": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="merged_with_next")
    (row,) = TextEncoder(tokenizer, TokenizerSettings(max_len=8, pool_prompt=False)).encode(["how"], ["Query: x "])
    assert row.ids == [1, 2, 3]
    assert row.excluded == 2  # " how" (8, 12) ends past len("Query: x ") == 9: it carries text


def test_latent_pooling_ignores_pad_and_instruction_positions():
    model = _embedder("llama")
    hidden = torch.randn(2, 6, 64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    noisy = hidden.clone()
    noisy[mask == 0] = torch.randn(int((mask == 0).sum()), 64) * 100
    with torch.no_grad():
        a = model.pooler(hidden, mask, attention_mask)
        b = model.pooler(noisy, mask, attention_mask)
    assert torch.allclose(a, b, atol=1e-5)


def _dense_latent_pooling(pool, hidden, mask):
    """The released head as written: every position through attention and feed-forward, then the masked mean."""
    B, T, _ = hidden.shape
    H, Dh = pool.num_heads, pool.head_dim
    context = pool.norm_context(pool.latents)
    q = pool.to_q(pool.norm(hidden)).view(B, T, H, Dh).transpose(1, 2)
    k, v = (t.view(-1, H, Dh).transpose(0, 1).expand(B, -1, -1, -1) for t in pool.to_kv(context).chunk(2, -1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / Dh**0.5, dim=-1) @ v
    out = pool.to_out(attn.transpose(1, 2).reshape(B, T, H * Dh)) + hidden
    out = pool.ff(pool.norm_ff(out)) + out
    w = mask.unsqueeze(-1).float()
    return (out * w).sum(1) / w.sum(1).clamp(min=1e-9)


def test_latent_pooling_on_pooled_tokens_only_equals_the_dense_head():
    torch.manual_seed(0)
    pool = _embedder("llama").pooler
    hidden = torch.randn(3, 7, 64)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]
    )  # last row: nothing pooled
    hidden.requires_grad_(True)
    packed = pool(hidden, mask)
    dense = _dense_latent_pooling(pool, hidden, mask)
    assert torch.allclose(packed, dense, atol=1e-5) and (packed[2] == 0).all()
    g_packed = torch.autograd.grad(packed.square().sum(), [hidden, pool.latents, pool.to_q.weight])
    g_dense = torch.autograd.grad(dense.square().sum(), [hidden, pool.latents, pool.to_q.weight])
    for a, b in zip(g_packed, g_dense):
        assert torch.allclose(a, b, atol=1e-5)


def test_instruction_tokens_are_attended_to_but_not_pooled():
    model = _embedder("llama")
    other = "instruct: sort the data\nquery: "
    plain = torch.tensor(model.encode(TEXTS))
    a = torch.tensor(model.encode(TEXTS, prompt=INSTRUCT))
    b = torch.tensor(model.encode(TEXTS, prompt=other))
    assert not torch.allclose(a, b, atol=1e-4)  # attended to: the instruction changes the embedding
    assert not torch.allclose(a, plain, atol=1e-4)
    batch = model.tokenize(TEXTS, prompt=INSTRUCT)
    n_instr = (batch["attention_mask"] - batch["pooling_mask"]).sum(1)
    assert (n_instr == n_instr[0]).all() and n_instr[0] == 1 + len(model.tokenizer.tokenize(INSTRUCT))
