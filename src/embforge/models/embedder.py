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
from embforge.modeling.embedding import embed, prepare_backbone
from embforge.modeling.head import HeadSpec
from embforge.modeling.pooling import build_pooler
from embforge.modeling.tokenization import Row, TextEncoder, TokenizerSettings, token_ids
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.heads import resolve_pooling
from embforge.models.matryoshka import check_dimensions
from embforge.models.prompts import SideEncoding, resolve_prompt
from embforge.precision import autocast, resolve_precision


class Embedder(SideEncoding, nn.Module):
    """Text -> embedding model.

    Args:
        backbone: a transformers base model returning ``last_hidden_state`` (B, T, D);
            encoder or decoder (``modeling.attention.DECODER_MODEL_TYPES``), maybe wrapped by ``peft``.
        tokenizer: its fast tokenizer (None only for shape-only models on the meta device).
        head: the :class:`~embforge.modeling.head.HeadSpec` (default: mean pooling, L2-normalised);
            its settings left to the model are resolved here, and :attr:`head` holds the result.
        pooler: a pooler module to use instead of building one from ``head.pooling`` (its
            ``config()`` becomes the spec's pooling).
        precision: of inference (``encode``, ``serve``): ``auto`` | ``fp32`` | ``bf16``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        head: HeadSpec | None = None,
        *,
        pooler: nn.Module | None = None,
        precision: str = "auto",
    ):
        super().__init__()
        head = head or HeadSpec()
        self.backbone = prepare_backbone(backbone)  # stateless NTK rotary, packed attention (idempotent)
        # BERT-style task poolers are never part of the embedding path: freeze them so that
        # DDP does not wait for gradients they never get (and the optimizer skips them)
        bert_pooler = getattr(backbone, "pooler", None)
        if isinstance(bert_pooler, nn.Module):
            bert_pooler.requires_grad_(False)
        config = backbone.config
        self.is_decoder = is_decoder(config)
        if pooler is None:
            try:  # on the backbone's device: a meta backbone gets a meta head (no memory)
                with torch.device(next(backbone.parameters()).device):
                    pooler = build_pooler(head.pooling, int(config.hidden_size))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"pooling {head.pooling}: {exc}") from exc
        self.pooler = pooler
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.pad_token is None:  # decoders often have none; pads are masked
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model_max = getattr(config, "max_position_embeddings", None)
        self.head = head.replace(  # what the spec leaves to the model, resolved
            pooling=pooler.config(),
            max_seq_len=int(head.max_seq_len or min(model_max or 512, 512)),
            add_eos=self.is_decoder if head.add_eos is None else head.add_eos,
            padding_side=head.padding_side or (tokenizer.padding_side if tokenizer is not None else "right"),
        )
        resolve_precision(precision, "cpu")  # validates the name
        self.precision = precision  # of inference (encode, serve); training has its stage's own
        self._text_encoder: TextEncoder | None = None  # built from the settings on first use

    @property
    def head(self) -> HeadSpec:
        """Everything besides the weights that defines the embedding (see :class:`~embforge.modeling.head.HeadSpec`)."""
        return self._head

    @head.setter
    def head(self, head: HeadSpec) -> None:
        """Replace the spec (``emb.head = emb.head.replace(prompts=...)``); the pooling must stay the pooler's."""
        if head.pooling != self.pooler.config():
            raise ConfigError(
                f"head.pooling {head.pooling} is not this model's pooler {self.pooler.config()}: a new pooling "
                "needs a new model (Embedder.load(..., pooling=..., new_head=True))"
            )
        if head.attention == "causal" and not self.is_decoder:
            raise ConfigError(
                f"attention: causal applies to decoder LLMs; {self.backbone.config.model_type!r} is an encoder"
            )
        if None in (head.max_seq_len, head.add_eos, head.padding_side):
            raise ConfigError("an Embedder's head spec is resolved: max_seq_len, add_eos and padding_side set")
        if self.tokenizer is not None:
            self.tokenizer.padding_side = head.padding_side
        self._head = head

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
            **overrides: head settings (:class:`~embforge.modeling.head.HeadSpec` fields) that replace
                what the folder says (``max_seq_len=128``, ``prompts={...}``), and ``precision``
                (of inference). ``pooling`` is resolved against the
                folder's head (:func:`embforge.models.heads.resolve_pooling`): settings it
                leaves out take the folder's values, and a trained head loads unless
                ``new_head``; a request that conflicts with a trained head is a ``ConfigError``.
        """
        from embforge.models.saving import load_folder, model_folder

        folder = model_folder(name_or_path)
        meta = str(device) == "meta"  # shapes only: the backbone from the folder's config, no weights read
        loaded = load_folder(folder, weights=not meta)
        precision = overrides.pop("precision", "auto")
        load_head = loaded.trained_head
        if "pooling" in overrides or new_head:
            overrides["pooling"], load_head = resolve_pooling(
                overrides.get("pooling", loaded.head.pooling),
                loaded.head.pooling,
                int(loaded.backbone.config.hidden_size),
                trained=loaded.trained_head,
                new_head=new_head,
                where=str(folder),
            )
        try:
            head = loaded.head.replace(**overrides)
        except (TypeError, ValueError) as exc:  # an unknown setting, or a value of the wrong kind
            raise ConfigError(f"Embedder.load({str(name_or_path)!r}): {exc}") from exc
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = cls(loaded.backbone, loaded.tokenizer, head, precision=precision)
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
            (B, D) embeddings, L2-normalised if ``head.normalize``.
        """
        return embed(
            self.backbone, self.pooler, input_ids, attention_mask, pooling_mask, head=self.head, **backbone_inputs
        )

    def tokenize(
        self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompted, truncated, padded batch on the model's device.

        Args:
            texts: the texts.
            prompt_name: a key of ``head.prompts`` (default: ``head.default_prompt_name``).
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
            prompt_name: key of ``head.prompts`` to prepend (default: ``head.default_prompt_name``).
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
                    pooled = embed(self.backbone, self.pooler, **batch, head=self.head, normalize=False)
                    pooled = pooled[:, :dim].float()  # (B, D')
                    if self.head.normalize:
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

    # ------------------------------------------------------------------ tokenisation
    def tokenizer_settings(self) -> TokenizerSettings:
        """What decides this model's tokens besides the vocabulary: the head's window, EOS, padding side,
        prompt pooling and case, with the tokenizer's pad and EOS ids."""
        try:
            return TokenizerSettings.for_head(self.head, **token_ids(self.tokenizer))
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
            prompt = resolve_prompt(self.head, prompt_name)
        prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(texts):
            raise InputError(f"got {len(prompts)} prompts for {len(texts)} texts")
        return self.text_encoder.encode(list(texts), prompts)
