"""The :class:`Embedder`: a transformers backbone + pooling + normalisation + prompts.

It is the one object users hold::

    emb = Embedder.load("all-MiniLM-L6-v2")
    q = emb.encode_queries(["how do I sort a list?"])      # (1, 384) float32, L2-normalised
    d = emb.encode_documents(docs, dimensions=128)          # Matryoshka truncation
    emb.save("my-model")                                    # loads in sentence-transformers too

It is also an ``nn.Module`` whose ``forward`` maps a tokenised batch to embeddings with
gradients, which is what the training loop calls.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from embforge.config import did_you_mean
from embforge.errors import ConfigError, InputError
from embforge.models.pooling import Pooling, PoolingName
from embforge.models.registry import resolve_model_path
from embforge.models.st_format import StLayout, read_layout, write_layout

# texts are encoded in batches of similar token length; a progress bar appears past this many
_PROGRESS_MIN_BATCHES = 8


class Embedder(nn.Module):
    """Text -> embedding model.

    Args:
        backbone: a transformers model returning ``last_hidden_state`` (B, T, D).
        tokenizer: its (fast) tokenizer.
        pooling: ``"mean"``, ``"cls"`` or ``"last"``.
        normalize: L2-normalise the embeddings (after any Matryoshka truncation).
        max_seq_len: inputs are truncated to this many tokens (prompt included).
        prompts: prompt name -> text prepended to inputs, e.g. ``{"query": "search_query: "}``.
        default_prompt_name: prompt used when ``encode`` gets none.
        do_lower_case: lower-case texts before tokenising (some sentence-transformers models).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        pooling: PoolingName = "mean",
        normalize: bool = True,
        max_seq_len: int | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        do_lower_case: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        # BERT-style task poolers are never part of the embedding path: freeze them so that
        # DDP does not wait for gradients they never get (and the optimizer skips them)
        pooler = getattr(backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = Pooling(pooling)
        self.normalize = normalize
        model_max = getattr(backbone.config, "max_position_embeddings", None)
        self.max_seq_len = int(max_seq_len or min(model_max or 512, 512))
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ConfigError(
                f"default_prompt_name {default_prompt_name!r} is not among the prompts {sorted(self.prompts)}"
            )
        self.default_prompt_name = default_prompt_name
        self.do_lower_case = do_lower_case

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def load(cls, name_or_path: str | Path, *, device: str | torch.device | None = None, **overrides) -> Embedder:
        """Load a known packaged model name or a local folder (sentence-transformers or transformers).

        Args:
            name_or_path: e.g. ``"all-MiniLM-L6-v2"`` or ``"runs/my-model"``.
            device: where to put the model (default: CUDA if available, else CPU).
            **overrides: constructor arguments that replace what the folder says
                (``max_seq_len=128``, ``pooling="cls"``, ``prompts={...}``).
        """
        from transformers import AutoModel, AutoTokenizer  # heavy: import on use

        folder = resolve_model_path(name_or_path)
        layout = read_layout(folder)
        tokenizer = AutoTokenizer.from_pretrained(layout.backbone_dir, local_files_only=True)
        backbone = AutoModel.from_pretrained(layout.backbone_dir, local_files_only=True)
        kwargs = dict(
            pooling=layout.pooling,
            normalize=layout.normalize,
            max_seq_len=layout.max_seq_len,
            prompts=layout.prompts,
            default_prompt_name=layout.default_prompt_name,
            do_lower_case=layout.do_lower_case,
        )
        kwargs.update(overrides)
        model = cls(backbone, tokenizer, **kwargs)
        model.eval()
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(self, path: str | Path) -> Path:
        """Write the model as a sentence-transformers folder, atomically.

        The folder is written beside ``path`` and renamed into place only when complete, so
        a crash never leaves a half-written model (an existing folder is replaced).
        """
        import embforge

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            layout = StLayout(
                backbone_dir=tmp,
                pooling=self.pooling.mode,
                normalize=self.normalize,
                max_seq_len=self.max_seq_len,
                do_lower_case=self.do_lower_case,
                prompts=self.prompts,
                default_prompt_name=self.default_prompt_name,
            )
            versions = {"embforge": embforge.__version__, "torch": torch.__version__}
            write_layout(tmp, hidden_size=self.hidden_size, layout=layout, versions=versions)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ the differentiable path
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **backbone_inputs) -> torch.Tensor:
        """Tokenised batch -> embeddings (with gradients when training).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            **backbone_inputs: extra backbone inputs such as ``token_type_ids``.

        Returns:
            (B, D) embeddings, L2-normalised if ``self.normalize``.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_inputs).last_hidden_state
        pooled = self.pooling(hidden, attention_mask)  # (B, D)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None) -> dict[str, torch.Tensor]:
        """Prompted, truncated, right-padded batch on the model's device."""
        texts = self._prompted(texts, prompt_name)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_len, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ inference
    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 32,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts (inference mode, batches of similar length).

        Args:
            texts: one string or a sequence of strings.
            batch_size: texts per forward pass.
            prompt_name: key of ``self.prompts`` to prepend (default: ``default_prompt_name``).
            dimensions: keep the first ``dimensions`` components (Matryoshka), then re-normalise.
            show_progress: progress bar; default on for long inputs.

        Returns:
            float32 array (N, D') — or (D',) for a single string.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InputError(f"texts[{i}] must be a string, got {type(text).__name__}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        dim = self._check_dimensions(dimensions)
        out = np.empty((len(items), dim), dtype=np.float32)
        if items:
            # tokenise everything once, then batch by exact token length: least padding
            ids = self.tokenizer(
                self._prompted(items, prompt_name),
                truncation=True,
                max_length=self.max_seq_len,
                add_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            order = np.argsort([-len(x) for x in ids], kind="stable")
            starts = range(0, len(items), batch_size)
            show = show_progress if show_progress is not None else len(starts) >= _PROGRESS_MIN_BATCHES
            pad_id = self.tokenizer.pad_token_id or 0
            was_training = self.training
            self.eval()
            with torch.inference_mode():
                for start in tqdm(starts, desc="encode", unit="batch", disable=not show):
                    idx = order[start : start + batch_size]
                    input_ids, mask = _pad([ids[i] for i in idx], pad_id, self.device)
                    hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
                    pooled = self.pooling(hidden, mask)[:, :dim].float()  # (B, D')
                    if self.normalize:
                        pooled = nn.functional.normalize(pooled, dim=-1)
                    out[idx] = pooled.cpu().numpy()
            self.train(was_training)
        return out[0] if single else out

    def encode_queries(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``query`` prompt when the model defines one."""
        kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(texts, **kwargs)

    def encode_documents(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``document`` prompt when the model defines one."""
        kwargs.setdefault("prompt_name", "document" if "document" in self.prompts else None)
        return self.encode(texts, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _prompted(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        prefix = ""
        if name is not None:
            if name not in self.prompts:
                raise InputError(
                    f"unknown prompt_name {name!r}"
                    + did_you_mean(name, self.prompts)
                    + f"; this model has {sorted(self.prompts)}"
                )
            prefix = self.prompts[name]
        texts = [prefix + t for t in texts]
        return [t.lower() for t in texts] if self.do_lower_case else texts

    def _check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.hidden_size
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.hidden_size:
            raise InputError(f"dimensions must be an integer in [1, {self.hidden_size}], got {dimensions!r}")
        return dimensions


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> input_ids (B, T) and attention_mask (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return input_ids.to(device), mask.to(device)
