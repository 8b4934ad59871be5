"""The :class:`Embedder`: a backbone + a pooling head (maybe trainable) + normalisation + prompts.

It is the one object users hold::

    emb = Embedder.load("all-MiniLM-L6-v2")
    q = emb.encode_queries(["how do I sort a list?"])      # (1, 384) float32, L2-normalised
    d = emb.encode_documents(docs, dimensions=128)          # Matryoshka truncation
    emb.save("my-model")                                    # loads in sentence-transformers too

It is also an ``nn.Module`` whose ``forward`` maps a tokenised batch to embeddings with
gradients, which is what the training loop calls. The backbone may be an encoder (BERT
family) or a decoder LLM run bidirectionally (NV-Embed); the pooler may be a trainable
latent-attention head; prompts may be instructions that are attended to but not pooled.
The forward pass itself lives in :mod:`embforge.models.portable`, which saved folders carry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from embforge.errors import ConfigError, InputError
from embforge.models import portable
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.matryoshka import check_dimensions
from embforge.models.prompts import resolve_prompt
from embforge.models.registry import resolve_model_path
from embforge.precision import autocast, resolve_precision


class Embedder(nn.Module):
    """Text -> embedding model.

    Args:
        backbone: a transformers base model returning ``last_hidden_state`` (B, T, D);
            encoder or decoder (``portable.DECODER_MODEL_TYPES``), maybe wrapped by ``peft``.
        tokenizer: its fast tokenizer.
        pooling: a name (``mean``, ``cls``, ``last``, ``latent``, ``self_attention``), a pooler
            settings dict (``{"name": "latent", "head_dim": 64}``) or a pooler module.
        normalize: L2-normalise the embeddings (after any Matryoshka truncation).
        max_seq_len: inputs are truncated to this many tokens (prompt and EOS included).
        prompts: prompt name -> text prepended to inputs, e.g. ``{"query": "search_query: "}``.
        default_prompt_name: prompt used when ``encode`` gets none.
        do_lower_case: lower-case texts before tokenising (some sentence-transformers models).
        attention: ``bidirectional`` (causal mask removed) or ``causal``; decoders only.
        add_eos: append EOS to every input (default: true for decoders).
        pool_prompt: false: prompts are instructions, attended to but left out of pooling.
        padding_side: ``left`` or ``right`` (default: the tokenizer's).
        instruction_template: how a task instruction becomes a query prompt, e.g.
            ``"Instruct: {instruction}\\nQuery: "`` (NV-Embed); None: the model takes no instructions.
        matryoshka_rule: how embeddings are shortened to ``dimensions``: ``truncate`` (then
            L2-normalise) or ``layer_norm`` (Nomic Embed v1.5: non-affine layer norm over all
            dimensions, then truncate, then L2-normalise; see ``portable.matryoshka_norm``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        pooling: str | dict | nn.Module = "mean",
        normalize: bool = True,
        max_seq_len: int | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        do_lower_case: bool = False,
        attention: str = "bidirectional",
        add_eos: bool | None = None,
        pool_prompt: bool = True,
        padding_side: str | None = None,
        instruction_template: str | None = None,
        matryoshka_rule: str = "truncate",
        precision: str = "auto",
    ):
        super().__init__()
        self.backbone = backbone
        # BERT-style task poolers are never part of the embedding path: freeze them so that
        # DDP does not wait for gradients they never get (and the optimizer skips them)
        bert_pooler = getattr(backbone, "pooler", None)
        if isinstance(bert_pooler, nn.Module):
            bert_pooler.requires_grad_(False)
        config = backbone.config
        self.is_decoder = portable.is_decoder(config)
        if attention not in ("bidirectional", "causal"):
            raise ConfigError(f"attention must be 'bidirectional' or 'causal', got {attention!r}")
        if attention == "causal" and not self.is_decoder:
            raise ConfigError(f"attention: causal applies to decoder LLMs; {config.model_type!r} is an encoder")
        self.attention = attention
        if isinstance(pooling, nn.Module):
            self.pooler = pooling
        else:
            settings = {"name": pooling} if isinstance(pooling, str) else dict(pooling)
            try:  # on the backbone's device: a meta backbone gets a meta head (no memory)
                with torch.device(next(backbone.parameters()).device):
                    self.pooler = portable.build_pooler(settings, int(config.hidden_size))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"pooling {settings}: {exc}") from exc
        self.tokenizer = tokenizer  # None only for shape-only (meta device) models
        if tokenizer is not None and padding_side is not None:
            tokenizer.padding_side = padding_side
        if tokenizer is not None and tokenizer.pad_token is None:  # decoders often have none; pads are masked
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.normalize = normalize
        self.add_eos = self.is_decoder if add_eos is None else add_eos
        self.pool_prompt = pool_prompt
        model_max = getattr(config, "max_position_embeddings", None)
        self.max_seq_len = int(max_seq_len or min(model_max or 512, 512))
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ConfigError(
                f"default_prompt_name {default_prompt_name!r} is not among the prompts {sorted(self.prompts)}"
            )
        self.default_prompt_name = default_prompt_name
        self.do_lower_case = do_lower_case
        self.instruction_template = instruction_template
        if matryoshka_rule not in portable.MATRYOSHKA_RULES:
            raise ConfigError(f"matryoshka_rule must be one of {portable.MATRYOSHKA_RULES}, got {matryoshka_rule!r}")
        self.matryoshka_rule = matryoshka_rule
        resolve_precision(precision, "cpu")  # validates the name
        self.precision = precision  # of inference (encode, serve); training has its stage's own

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def load(cls, name_or_path: str | Path, *, device: str | torch.device | None = None, **overrides) -> Embedder:
        """Load a known packaged model name or a local folder.

        Folders written by embforge, sentence-transformers folders and bare transformers
        folders all load (see :mod:`embforge.models.saving`).

        Args:
            name_or_path: e.g. ``"all-MiniLM-L6-v2"`` or ``"runs/my-model"``.
            device: where to put the model (default: CUDA if available, else CPU).
            **overrides: constructor arguments that replace what the folder says
                (``max_seq_len=128``, ``pooling="cls"``, ``prompts={...}``). A pooling that
                differs from the folder's trained head starts a new, randomly initialised head.
        """
        from embforge.models.saving import load_folder

        folder = resolve_model_path(name_or_path)
        meta = str(device) == "meta"  # shapes only: the backbone from the folder's config, no weights read
        backbone, tokenizer, kwargs, pooler_state = load_folder(folder, weights=not meta)
        same_head = "pooling" not in overrides or overrides["pooling"] == kwargs.get("pooling")
        kwargs.update(overrides)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = cls(backbone, tokenizer, **kwargs)
        if pooler_state and same_head:
            model.pooler.load_state_dict(pooler_state)
        model.eval()
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(self, path: str | Path, *, merge_lora: bool = True) -> Path:
        """Write the model folder atomically (an existing folder is replaced as a whole).

        Encoders with a parameter-free pooling are written as a plain sentence-transformers
        folder; anything else (decoders, trainable heads, instruction masking) as an embforge
        folder that ``transformers`` (``trust_remote_code=True``) and sentence-transformers
        also load. ``merge_lora=False`` keeps a LoRA adapter in ``adapter/`` instead of merging it.
        """
        from embforge.models.saving import save_folder

        return save_folder(self, Path(path), merge_lora=merge_lora)

    def head_settings(self) -> dict:
        """Everything besides the weights that defines the embedding (constructor keywords)."""
        return {
            "pooling": self.pooler.config(),
            "normalize": self.normalize,
            "max_seq_len": self.max_seq_len,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "do_lower_case": self.do_lower_case,
            "attention": self.attention,
            "add_eos": self.add_eos,
            "pool_prompt": self.pool_prompt,
            "padding_side": self.tokenizer.padding_side if self.tokenizer is not None else None,
            "instruction_template": self.instruction_template,
            "matryoshka_rule": self.matryoshka_rule,
        }

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ the differentiable path
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pooling_mask: torch.Tensor | None = None,
        **backbone_inputs,
    ) -> torch.Tensor:
        """Tokenised batch -> embeddings (with gradients when training).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            pooling_mask: (B, T), 1 for tokens that are pooled (default: ``attention_mask``).
            **backbone_inputs: extra backbone inputs such as ``token_type_ids``.

        Returns:
            (B, D) embeddings, L2-normalised if ``self.normalize``.
        """
        return portable.embed(
            self.backbone,
            self.pooler,
            input_ids,
            attention_mask,
            pooling_mask,
            bidirectional=self.attention == "bidirectional",
            normalize=self.normalize,
            matryoshka_rule=self.matryoshka_rule,
            **backbone_inputs,
        )

    def tokenize(
        self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompted, truncated, padded batch on the model's device.

        Args:
            texts: the texts.
            prompt_name: a key of ``self.prompts`` (default: ``default_prompt_name``).
            prompt: prompt text instead of a name, one for all or one per text.

        Returns:
            ``input_ids``, ``attention_mask`` and ``pooling_mask``, each (B, T).
        """
        ids, excluded = self._token_ids(texts, prompt_name, prompt)
        device = self.device
        device = "cpu" if device.type == "meta" else device  # a meta model (an FSDP rank > 0) still tokenises
        return portable.pad_batch(self.tokenizer, ids, excluded, device=device)

    # ------------------------------------------------------------------ inference
    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        show_progress: bool | None = None,
        precision: str | None = None,
    ) -> np.ndarray:
        """Embed texts (inference mode, batches of similar length).

        Args:
            texts: one string or a sequence of strings.
            batch_size: texts per forward pass.
            prompt_name: key of ``self.prompts`` to prepend (default: ``default_prompt_name``).
            prompt: a prompt text instead of a name (e.g. a task instruction).
            dimensions: keep the first ``dimensions`` components (Matryoshka, after the model's
                ``matryoshka_rule``), then re-normalise.
            show_progress: progress bar; default on for long inputs.
            precision: ``auto`` | ``fp32`` | ``bf16`` (default: the model's ``precision``,
                ``auto`` unless loaded otherwise: bf16 autocast where the device runs bf16
                natively, see :func:`embforge.precision.resolve_precision`).

        Returns:
            float32 array (N, D') — or (D',) for a single string.
        """
        items, single = encode_items(texts, batch_size)
        dim = check_dimensions(dimensions, self.hidden_size)
        out = np.empty((len(items), dim), dtype=np.float32)
        if items:
            # tokenise everything once, then batch by exact token length: least padding
            ids, excluded = self._token_ids(items, prompt_name, prompt)
            batches = length_batches(ids, batch_size)
            show = show_progress if show_progress is not None else len(batches) >= PROGRESS_MIN_BATCHES
            was_training = self.training
            self.eval()
            with torch.inference_mode(), self.inference_autocast(precision):
                for idx in tqdm(batches, desc="encode", unit="batch", disable=not show):
                    batch = portable.pad_batch(
                        self.tokenizer, [ids[i] for i in idx], [excluded[i] for i in idx], device=self.device
                    )
                    pooled = portable.embed(
                        self.backbone,
                        self.pooler,
                        **batch,
                        bidirectional=self.attention == "bidirectional",
                        normalize=False,
                        matryoshka_rule=self.matryoshka_rule,
                    )[:, :dim].float()  # (B, D')
                    if self.normalize:
                        pooled = nn.functional.normalize(pooled, dim=-1)
                    out[idx] = pooled.cpu().numpy()
            self.train(was_training)
        return out[0] if single else out

    @property
    def inference_precision(self) -> str:
        """The precision inference runs at on this device: ``self.precision`` resolved (``fp32`` or ``bf16``)."""
        return resolve_precision(self.precision, self.device)

    def inference_autocast(self, precision: str | None = None):
        """The autocast context that inference runs under (``precision`` or the model's own)."""
        return autocast(precision or self.precision, self.device)

    def encode_queries(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``query`` prompt when the model defines one."""
        if "prompt" not in kwargs:
            kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(texts, **kwargs)

    def encode_documents(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """:meth:`encode` with the ``document`` prompt when the model defines one."""
        if "prompt" not in kwargs:
            kwargs.setdefault("prompt_name", "document" if "document" in self.prompts else None)
        return self.encode(texts, **kwargs)

    def instruction_prompt(self, instruction: str) -> str | None:
        """The query prompt for a task instruction, or None if this model takes no instructions."""
        if self.instruction_template is None:
            return None
        return self.instruction_template.format(instruction=instruction)

    # ------------------------------------------------------------------ helpers
    def _token_ids(
        self, texts: Sequence[str], prompt_name: str | None, prompt: str | Sequence[str] | None
    ) -> tuple[list[list[int]], list[int]]:
        if prompt is not None and prompt_name is not None:
            raise InputError("give prompt_name or prompt, not both")
        if prompt is None:
            prompt = resolve_prompt(self.prompts, self.default_prompt_name, prompt_name)
        prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(texts):
            raise InputError(f"got {len(prompts)} prompts for {len(texts)} texts")
        return portable.tokenize_texts(
            self.tokenizer,
            texts,
            prompts,
            max_len=self.max_seq_len,
            add_eos=self.add_eos,
            pool_prompt=self.pool_prompt,
            lower_case=self.do_lower_case,
        )
