"""The one place optional dependencies are imported.

Heavy or optional packages (fastapi, mteb, onnxruntime, sentence-transformers, ...) are
imported lazily through :func:`require`, so a missing one fails with an install hint
instead of an ``ImportError`` deep inside a call stack.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from embforge.errors import MissingDependencyError

# module name -> the pip extra of embforge that installs it
EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "mteb": "mteb",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "openvino": "openvino",
    "nncf": "openvino",
    "prometheus_client": "serve",
    "starlette": "serve",
    "openai": "dev",
    "sentence_transformers": "dev",
    "matplotlib": "plot",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    Args:
        module: dotted module name, e.g. ``"fastapi"`` or ``"mteb"``.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'embforge[{extra}]'" if extra else f"pip install {top}"
        raise MissingDependencyError(f"{module!r} is required for this feature but is not installed: {hint}") from exc
