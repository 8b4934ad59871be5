"""Tiny, randomly initialised models built from configs (no downloads), for tests and docs.

They are the real architectures shrunk (2 layers, width 64) with a small WordPiece
vocabulary, so behaviour (padding, pooling, training, saving) is exercised in seconds.
"""

from __future__ import annotations

import string

import torch

TINY_WORDS = (
    "the a an of to in is for on with as by at from sort list dict file read write open close path "
    "string number value return error key item data model text query document search find match "
    "python function class method tuple set map filter reduce cat dog runs fast slow red blue green"
).split()


def tiny_vocab() -> dict[str, int]:
    """Special tokens, characters, ``##`` suffix characters and a few whole words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + sorted(set(TINY_WORDS))
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def tiny_bert(seed: int = 0, **config_overrides):
    """(BertModel, tokenizer): 2 layers, hidden 64, 4 heads, seeded random init, eval mode."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=tiny_vocab(), do_lower_case=True)
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**cfg))
    model.eval()
    return model, tokenizer


DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_bpe(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on ``texts``, with a decoder's BOS (Llama/Qwen style), EOS and pad.

    Deterministic for the same texts; its tokens carry the space before a word, as real
    decoders' do (instruction spans then end inside a token's offsets).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_decoder(
    family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", tokenizer=None, **config_overrides
):
    """(base decoder model, tokenizer): 2 layers, hidden 64, 4 heads / 2 KV heads, seeded random init.

    The tokenizer is the tiny WordPiece one with ``[CLS]`` playing BOS and ``[SEP]`` EOS, so
    tests see a leading special token and an EOS-terminated input, as with real decoders; or
    ``tokenizer`` (e.g. :func:`tiny_bpe`), which needs BOS, EOS and pad tokens.
    """
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    if family not in DECODER_FAMILIES:
        raise ValueError(f"unknown decoder family {family!r}; choose one of {DECODER_FAMILIES}")
    if tokenizer is None:
        tokenizer = BertTokenizerFast(vocab=tiny_vocab(), do_lower_case=True, bos_token="[CLS]", eos_token="[SEP]")
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "qwen3":
        cfg["head_dim"] = 16
    cfg.update(config_overrides)
    config = AutoConfig.for_model(family, **cfg)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.eval()
    return model, tokenizer


TINY_LATENT_HEAD = {"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16}


def tiny_nv_embedder(family: str = "qwen2", seed: int = 0, **embedder_kwargs):
    """A tiny NV-Embed-style Embedder: :func:`tiny_decoder` (bidirectional), a latent head, and
    instructions attended to but left out of pooling; ``embedder_kwargs`` add or replace head settings
    (:class:`~embforge.modeling.head.HeadSpec` fields) or give ``precision``."""
    from embforge.modeling.head import HeadSpec
    from embforge.models.embedder import Embedder

    backbone, tokenizer = tiny_decoder(family, seed=seed)
    precision = embedder_kwargs.pop("precision", "auto")
    head = HeadSpec(**{"pooling": dict(TINY_LATENT_HEAD), "pool_prompt": False, **embedder_kwargs})
    return Embedder(backbone, tokenizer, head, precision=precision)
