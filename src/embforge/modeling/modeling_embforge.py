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
from .lora import load_and_merge
from .pooling import build_pooler
from .tokenization import TextEncoder, TokenizerSettings


class EmbforgeConfig(PretrainedConfig):
    """A backbone config (nested) + everything that turns its states into an embedding.

    Args:
        backbone: the backbone's config as a dict (``model_type`` and its fields).
        pooling: the pooler's settings (``pooling.build_pooler``).
        bidirectional: decoders: the causal mask removed (NV-Embed) or kept.
        normalize: L2-normalise the embeddings.
        matryoshka_rule: ``truncate`` or ``layer_norm`` (``embedding.matryoshka_norm``).
        tokenization: :class:`.tokenization.TokenizerSettings` as a dict.
        prompts / default_prompt_name: named prompts, e.g. ``{"query": "search_query: "}``.
        instruction_template: how a task instruction becomes a query prompt, or None.
    """

    model_type = "embforge"

    def __init__(
        self,
        backbone: dict | None = None,
        pooling: dict | None = None,
        bidirectional: bool = True,
        normalize: bool = True,
        matryoshka_rule: str = "truncate",
        tokenization: dict | None = None,
        prompts: dict | None = None,
        default_prompt_name: str | None = None,
        instruction_template: str | None = None,
        **kwargs,
    ):
        self.backbone = dict(backbone or {})
        self.pooling = dict(pooling or {"name": "mean"})
        self.bidirectional = bidirectional
        self.normalize = normalize
        self.matryoshka_rule = matryoshka_rule
        self.tokenization = dict(tokenization or {"max_len": 512})
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.instruction_template = instruction_template
        super().__init__(**kwargs)

    def backbone_config(self):
        cfg = dict(self.backbone)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The prompt text for a name (default: ``default_prompt_name``) or as given; "" for none."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(f"unknown prompt_name {name!r}; this model has {sorted(self.prompts)}")
        return self.prompts[name]


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
        self.backbone = prepare_backbone(AutoModel.from_config(bb_cfg))
        self.pooler = build_pooler(config.pooling, bb_cfg.hidden_size)
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
        return TextEncoder(tokenizer, TokenizerSettings(**self.config.tokenization))

    def tokenize(
        self, tokenizer, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompted, truncated, padded batch (``input_ids``, ``attention_mask``, ``pooling_mask``) on this model's device."""
        prefix = self.config.prompt(prompt_name, prompt)
        return self.text_encoder(tokenizer)(list(texts), [prefix] * len(texts)).to_torch(self.device)

    def forward(self, input_ids, attention_mask, pooling_mask=None, **extra):
        emb = embed(
            self.backbone,
            self.pooler,
            input_ids,
            attention_mask,
            pooling_mask,
            bidirectional=self.config.bidirectional,
            normalize=self.config.normalize,
            matryoshka_rule=self.config.matryoshka_rule,
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
