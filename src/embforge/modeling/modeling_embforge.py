"""A saved embforge model in ``transformers`` and sentence-transformers, without embforge installed.

:meth:`Embedder.save` copies this package's files into every embforge model folder;
``config.json``'s ``auto_map`` and ``modules.json`` point at the classes below::

    AutoModel.from_pretrained(folder, trust_remote_code=True)            # EmbforgeModel
    SentenceTransformer(folder, trust_remote_code=True)                  # EmbforgeSTModule

Both compute :func:`.embedding.embed` on batches from :class:`.tokenization.TextEncoder`,
exactly as ``Embedder`` does. The files import only the standard library, torch and
transformers (tests/unit/modeling/test_package.py checks it, and loads a folder in a
process where ``import embforge`` fails).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .embedding import embed, prepare_backbone
from .head import HeadSpec
from .lora import load_and_merge
from .pooling import build_pooler
from .tokenization import TextEncoder, TokenizerSettings, token_ids


class EmbforgeConfig(PretrainedConfig):
    """A backbone config (nested) + the head spec that turns its states into an embedding.

    Args:
        backbone: the backbone's config as a dict (``model_type`` and its fields).
        head: the model's :class:`.head.HeadSpec` as a dict (what the folder's ``embforge.json`` holds).
    """

    model_type = "embforge"

    def __init__(self, backbone: dict | None = None, head: dict | None = None, **kwargs):
        self.backbone = dict(backbone or {})
        self.head = dict(head or {})
        super().__init__(**kwargs)

    def backbone_config(self):
        cfg = dict(self.backbone)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def head_spec(self) -> HeadSpec:
        if not self.head:
            raise ValueError(
                "config.json has no head spec: this file was written for another version of the modeling "
                "code; load the folder with the embforge that saved it (Embedder.load) and save it again"
            )
        return HeadSpec.from_dict(self.head, "config.json head")


class EmbforgeModel(PreTrainedModel):
    """``backbone`` + ``pooler``: ``forward(input_ids, attention_mask, pooling_mask)`` -> ``.embeddings`` (B, D).

    Plain transformers use (the snippet in a saved folder's README.md)::

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        batch = model.tokenize(tokenizer, ["how do I sort a list?"], prompt_name="query")
        with torch.no_grad():
            embeddings = model(**batch).embeddings
    """

    config_class = EmbforgeConfig
    base_model_prefix = "embforge"
    _supports_sdpa = True

    def __init__(self, config: EmbforgeConfig):
        super().__init__(config)
        bb_cfg = config.backbone_config()
        self.head = config.head_spec()
        self.backbone = prepare_backbone(AutoModel.from_config(bb_cfg))
        self.pooler = build_pooler(self.head.pooling, bb_cfg.hidden_size)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loading, then the folder's LoRA adapter (``adapter/``, if any) merged in float32."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub = ("cache_dir", "revision", "token", "local_files_only", "force_download")
        load_and_merge(model.backbone, str(pretrained_model_name_or_path), **{k: kwargs[k] for k in hub if k in kwargs})
        return model

    def _init_weights(self, module):
        # the backbone (re)builds its own modules, e.g. rotary frequencies after a meta-device
        # load; the pooler's weights always come from the checkpoint
        backbone = getattr(self, "backbone", None)
        if backbone is not None and module is not self:
            backbone._init_weights(module)

    def text_encoder(self, tokenizer) -> TextEncoder:
        """This model's :class:`TextEncoder` over ``tokenizer`` (the folder's)."""
        return TextEncoder(tokenizer, TokenizerSettings.for_head(self.head, **token_ids(tokenizer)))

    def tokenize(
        self, tokenizer, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompted, truncated, padded batch (``input_ids``, ``attention_mask``, ``pooling_mask``) on this model's device."""
        prefix = prompt if prompt is not None else self.head.prompt(prompt_name)
        return self.text_encoder(tokenizer)(list(texts), [prefix] * len(texts)).to_torch(self.device)

    def forward(self, input_ids, attention_mask, pooling_mask=None, **extra):
        emb = embed(
            self.backbone,
            self.pooler,
            input_ids,
            attention_mask,
            pooling_mask,
            head=self.head,
            **extra,
        )
        return ModelOutput(embeddings=emb)


def _version(distribution: str) -> tuple[int, ...] | None:
    """The (major, minor) of an installed distribution, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version(distribution).split(".")[:2] if part.isdigit())
    except PackageNotFoundError:
        return None


class EmbforgeSTModule(nn.Module):
    """The whole embforge pipeline as one sentence-transformers module (prompt-aware tokenisation)."""

    MIN_SENTENCE_TRANSFORMERS = (6, 3)  # passes the prompt to preprocess(); older releases prepend it to the text

    def __init__(self, folder: str):
        super().__init__()
        found = _version("sentence-transformers")
        if found is not None and found < self.MIN_SENTENCE_TRANSFORMERS:
            raise ImportError(
                f"this embforge model needs sentence-transformers>={'.'.join(map(str, self.MIN_SENTENCE_TRANSFORMERS))}"
                f" (found {'.'.join(map(str, found))}): older releases put prompts into the text, where an "
                "instruction left out of pooling cannot be told apart; upgrade, or use AutoModel (README.md)"
            )
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # needs no code
        self.encoder = self.model.text_encoder(tokenizer)
        self.max_seq_length = self.encoder.settings.max_len

    @staticmethod
    def load(input_path: str) -> EmbforgeSTModule:
        return EmbforgeSTModule(input_path)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        return self.encoder(list(inputs), [prompt or ""] * len(inputs)).to_torch()

    tokenize = preprocess

    def forward(self, features: dict, **kwargs) -> dict:
        emb = self.model(features["input_ids"], features["attention_mask"], features.get("pooling_mask")).embeddings
        features["sentence_embedding"] = emb
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.model.config.backbone_config().hidden_size)

    def save(self, output_path: str, *args, **kwargs) -> None:
        raise NotImplementedError("save this model with embforge (Embedder.save), which writes every file it needs")
