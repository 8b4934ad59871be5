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
The forward pass and the tokeniser live in :mod:`embforge.modeling`, which saved folders carry.
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
from embforge.modeling.attention import is_decoder
from embforge.modeling.embedding import MATRYOSHKA_RULES, embed, prepare_backbone
from embforge.modeling.pooling import build_pooler
from embforge.modeling.tokenization import Row, TextEncoder, TokenizerSettings
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.heads import resolve_pooling
from embforge.models.matryoshka import check_dimensions
from embforge.models.prompts import resolve_prompt
from embforge.precision import autocast, resolve_precision


class Embedder(nn.Module):
    """Text -> embedding model.

    Args:
        backbone: a transformers base model returning ``last_hidden_state`` (B, T, D);
            encoder or decoder (``modeling.attention.DECODER_MODEL_TYPES``), maybe wrapped by ``peft``.
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
            dimensions, then truncate, then L2-normalise; see ``modeling.embedding.matryoshka_norm``).
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
        self.backbone = prepare_backbone(backbone)  # stateless NTK rotary, packed attention (idempotent)
        # BERT-style task poolers are never part of the embedding path: freeze them so that
        # DDP does not wait for gradients they never get (and the optimizer skips them)
        bert_pooler = getattr(backbone, "pooler", None)
        if isinstance(bert_pooler, nn.Module):
            bert_pooler.requires_grad_(False)
        config = backbone.config
        self.is_decoder = is_decoder(config)
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
                    self.pooler = build_pooler(settings, int(config.hidden_size))
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
        if matryoshka_rule not in MATRYOSHKA_RULES:
            raise ConfigError(f"matryoshka_rule must be one of {MATRYOSHKA_RULES}, got {matryoshka_rule!r}")
        self.matryoshka_rule = matryoshka_rule
        resolve_precision(precision, "cpu")  # validates the name
        self.precision = precision  # of inference (encode, serve); training has its stage's own
        self._text_encoder: TextEncoder | None = None  # built from the settings on first use

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        new_head: bool = False,
        **overrides,
    ) -> Embedder:
        """Load a known packaged model name or a local folder.

        Folders written by embforge, sentence-transformers folders and bare transformers
        folders all load (see :mod:`embforge.models.saving`).

        Args:
            name_or_path: e.g. ``"all-MiniLM-L6-v2"`` or ``"runs/my-model"``.
            device: where to put the model (default: CUDA if available, else CPU).
            new_head: start a new, randomly initialised pooling head from ``pooling`` even
                where the folder holds a trained one (which is then discarded).
            **overrides: constructor arguments that replace what the folder says
                (``max_seq_len=128``, ``prompts={...}``). ``pooling`` is resolved against the
                folder's head (:func:`embforge.models.heads.resolve_pooling`): settings it
                leaves out take the folder's values, and a trained head loads unless
                ``new_head``; a request that conflicts with a trained head is a ``ConfigError``.
        """
        from embforge.models.saving import load_folder, model_folder

        folder = model_folder(name_or_path)
        meta = str(device) == "meta"  # shapes only: the backbone from the folder's config, no weights read
        loaded = load_folder(folder, weights=not meta)
        kwargs = dict(loaded.settings)
        load_head = loaded.trained_head
        if "pooling" in overrides or new_head:
            overrides["pooling"], load_head = resolve_pooling(
                overrides.get("pooling", kwargs.get("pooling", "mean")),
                kwargs.get("pooling", "mean"),
                int(loaded.backbone.config.hidden_size),
                trained=loaded.trained_head,
                new_head=new_head,
                where=str(folder),
            )
        kwargs.update(overrides)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = cls(loaded.backbone, loaded.tokenizer, **kwargs)
        if loaded.pooler_state and load_head:
            model.pooler.load_state_dict(loaded.pooler_state)
        model.eval()
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(self, path: str | Path, *, merge_lora: bool = True, dtype: str = "float32") -> Path:
        """Write the model folder atomically (an existing folder is replaced as a whole).

        Encoders with a parameter-free pooling are written as a plain sentence-transformers
        folder; anything else (decoders, trainable heads, instruction masking, dynamic NTK) as
        an embforge folder that ``transformers`` (``trust_remote_code=True``) and
        sentence-transformers also load. ``merge_lora=False`` keeps a LoRA adapter in
        ``adapter/`` instead of merging it. LoRA is merged in float32; then every weight is
        cast to ``dtype`` (``float32`` or ``bfloat16``; a LoRA adapter kept apart stays float32).
        """
        from embforge.models.saving import save_folder

        return save_folder(self, Path(path), merge_lora=merge_lora, dtype=dtype)

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
        return embed(
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
        rows = self._rows(texts, prompt_name, prompt)
        device = self.device
        device = "cpu" if device.type == "meta" else device  # a meta model (an FSDP rank > 0) still tokenises
        return self.text_encoder.pad(rows).to_torch(device)

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
            rows = self._rows(items, prompt_name, prompt)
            batches = length_batches([r.ids for r in rows], batch_size)
            encoder = self.text_encoder
            show = show_progress if show_progress is not None else len(batches) >= PROGRESS_MIN_BATCHES
            was_training = self.training
            self.eval()
            with torch.inference_mode(), self.inference_autocast(precision):
                for idx in tqdm(batches, desc="encode", unit="batch", disable=not show):
                    batch = encoder.pad([rows[i] for i in idx]).to_torch(self.device)
                    pooled = embed(
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

    # ------------------------------------------------------------------ tokenisation
    def tokenizer_settings(self) -> TokenizerSettings:
        """What decides this model's tokens besides the vocabulary (saved with the model, used by every path)."""
        tok = self.tokenizer
        try:
            return TokenizerSettings(
                max_len=self.max_seq_len,
                pad_id=tok.pad_token_id or 0,
                padding_side=tok.padding_side,
                truncation_side=getattr(tok, "truncation_side", "right"),
                add_eos=self.add_eos,
                eos_id=tok.eos_token_id,
                pool_prompt=self.pool_prompt,
                lower_case=self.do_lower_case,
            )
        except ValueError as exc:
            raise ConfigError(f"tokenisation settings: {exc}") from exc

    @property
    def text_encoder(self) -> TextEncoder:
        """The :class:`~embforge.modeling.tokenization.TextEncoder` of the current settings (rebuilt when they change)."""
        settings = self.tokenizer_settings()
        enc = self._text_encoder
        if enc is None or enc.settings != settings or enc.source is not self.tokenizer:
            enc = self._text_encoder = TextEncoder(self.tokenizer, settings)
        return enc

    def _rows(self, texts: Sequence[str], prompt_name: str | None, prompt: str | Sequence[str] | None) -> list[Row]:
        if prompt is not None and prompt_name is not None:
            raise InputError("give prompt_name or prompt, not both")
        if prompt is None:
            prompt = resolve_prompt(self.prompts, self.default_prompt_name, prompt_name)
        prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(texts):
            raise InputError(f"got {len(prompts)} prompts for {len(texts)} texts")
        return self.text_encoder.encode(list(texts), prompts)
