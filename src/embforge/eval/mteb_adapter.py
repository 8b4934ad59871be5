"""Let the ``mteb`` package (v2) evaluate any embforge model.

    import mteb
    from embforge.eval.mteb_adapter import to_mteb
    results = mteb.evaluate(to_mteb(Embedder.load("runs/my-model")), mteb.get_tasks(tasks=["SciFact"]))

Real MTEB tasks download their data from the Hugging Face hub; offline, the adapter is
tested against mteb's own mock tasks. Prompt selection follows mteb's rules (task name,
task type, then ``query``/``document``) over the model's prompt names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embforge.modeling.head import prompts_of
from embforge.optional import require


def to_mteb(model: Any, name: str = "embforge/model", revision: str = "local") -> Any:
    """Wrap an object with ``encode(texts, batch_size=, prompt_name=)`` and ``prompts`` for ``mteb.evaluate``."""
    mteb_models = require("mteb.models")
    abs_encoder = require("mteb.models.abs_encoder")

    class EmbforgeMtebEncoder(abs_encoder.AbsEncoder):
        def __init__(self) -> None:
            self.model = model
            self.model_prompts = prompts_of(model)
            self.mteb_model_meta = mteb_models.ModelMeta.create_empty(overwrites={"name": name, "revision": revision})

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
            texts = [text for batch in inputs for text in batch["text"]]
            prompt_name = self.get_prompt_name(task_metadata, prompt_type)
            encode_kwargs: dict[str, Any] = {"batch_size": kwargs.get("batch_size", 32)}
            if prompt_name is not None:
                encode_kwargs["prompt_name"] = prompt_name
            return np.asarray(self.model.encode(texts, **encode_kwargs), dtype=np.float32)

    return EmbforgeMtebEncoder()
