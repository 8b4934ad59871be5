"""The one tokeniser: the transformers tokenizer's tokens, EOS and instruction spans, both padding sides."""

from __future__ import annotations

import numpy as np
import pytest

from embforge.modeling.tokenization import Row, TextEncoder, TokenBatch, TokenizerSettings
from embforge.models.tiny import tiny_bert, tiny_bpe, tiny_decoder

PROMPT = "Instruct: Given a question, retrieve passages\nQuery: "


@pytest.fixture(scope="module")
def tokenizers_under_test(real_sentences, minilm_dir):
    from transformers import AutoTokenizer

    return {
        "minilm-wordpiece": AutoTokenizer.from_pretrained(minilm_dir),
        "tiny-wordpiece": tiny_bert()[1],
        "byte-level-bpe": tiny_bpe(real_sentences),
    }


@pytest.mark.parametrize("name", ["minilm-wordpiece", "tiny-wordpiece", "byte-level-bpe"])
def test_tokens_equal_the_transformers_tokenizer_call_truncation_included(tokenizers_under_test, real_sentences, name):
    tok = tokenizers_under_test[name]
    texts = [*real_sentences, " ".join(real_sentences[:40]), "", "a"]  # one long text is truncated
    for max_len in (16, 128):
        enc = TextEncoder(tok, TokenizerSettings(max_len=max_len))
        expected = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        rows = enc.encode(texts, [""] * len(texts))
        assert [r.ids for r in rows] == expected
        whole = [len(x) for x in tok(texts)["input_ids"]]
        assert enc.count_tokens(texts, [""] * len(texts)) == whole
        assert [r.truncated for r in rows] == [n > max_len for n in whole]


@pytest.mark.parametrize("name", ["tiny-wordpiece", "byte-level-bpe"])
def test_eos_survives_truncation_and_is_not_doubled(tokenizers_under_test, name):
    tok = tokenizers_under_test[name]
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    enc = TextEncoder(tok, TokenizerSettings(max_len=8, add_eos=True, eos_id=eos))
    long_row, short_row = enc.encode(["the cat runs fast " * 10, "a"], ["", ""])
    # the WordPiece template ends with [SEP] (= EOS here) itself: truncated to 7 with it, nothing appended
    assert len(long_row.ids) == (7 if name == "tiny-wordpiece" else 8) and long_row.ids[-1] == eos
    assert long_row.ids.count(eos) == 1
    # shorter than the window, yet cut: the server counts (and refuses) it by this flag, not by its length
    assert long_row.truncated and not short_row.truncated
    assert short_row.ids[-1] == eos and short_row.ids.count(eos) == 1
    with pytest.raises(ValueError, match="no EOS"):
        TokenizerSettings(max_len=8, add_eos=True)


def test_instruction_span_is_the_prompt_tokens_inside_the_full_string(tokenizers_under_test):
    tok = tokenizers_under_test["byte-level-bpe"]
    enc = TextEncoder(tok, TokenizerSettings(max_len=64, pool_prompt=False))
    (row,) = enc.encode(["how do I sort a list"], [PROMPT])
    full = tok(PROMPT + "how do I sort a list", return_offsets_mapping=True)
    by_hand = sum(1 for end in (e for _, e in full["offset_mapping"]) if end <= len(PROMPT))  # BOS (0, 0) included
    assert row.ids == full["input_ids"] and row.excluded == by_hand
    pooled = TextEncoder(tok, TokenizerSettings(max_len=64)).encode(["how"], [PROMPT])[0]
    assert pooled.excluded == 0  # pool_prompt: the prompt is pooled like the text


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_and_the_pooling_mask(side):
    settings = TokenizerSettings(max_len=16, pad_id=7, padding_side=side)
    batch = TextEncoder(tiny_bert()[1], settings).pad([Row([1, 2, 3, 4], excluded=2), Row([5, 6], excluded=0)])
    ids, attention, pooling = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pooling_mask"))
    if side == "right":
        np.testing.assert_array_equal(ids, [[1, 2, 3, 4], [5, 6, 7, 7]])
        np.testing.assert_array_equal(pooling, [[0, 0, 1, 1], [1, 1, 0, 0]])
    else:
        np.testing.assert_array_equal(ids, [[1, 2, 3, 4], [7, 7, 5, 6]])
        np.testing.assert_array_equal(pooling, [[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(attention, (ids != 7).astype(np.int64))
    torch_batch = batch.to_torch()
    for name in TokenBatch.FIELDS:
        assert str(torch_batch[name].dtype) == "torch.int64"
        np.testing.assert_array_equal(torch_batch[name].numpy(), np.asarray(batch[name]))


def test_lower_case_applies_to_prompt_and_text():
    tok = tiny_decoder("llama")[1]
    lower = TextEncoder(tok, TokenizerSettings(max_len=32, lower_case=True, pool_prompt=False))
    plain = TextEncoder(tok, TokenizerSettings(max_len=32, pool_prompt=False))
    assert lower.encode(["SORT A List"], ["QUERY: "]) == plain.encode(["sort a list"], ["query: "])


def test_one_encoder_serves_many_threads(tokenizers_under_test, real_sentences):
    from concurrent.futures import ThreadPoolExecutor

    enc = TextEncoder(tokenizers_under_test["minilm-wordpiece"], TokenizerSettings(max_len=32))
    expected = enc.encode(real_sentences, [""] * len(real_sentences))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: enc.encode([s], [""])[0], real_sentences))
    assert results == expected
