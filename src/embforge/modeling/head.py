"""The head spec: the one description of how a backbone's states become an embedding.

:class:`HeadSpec` holds every setting besides the weights that decides an embedding —
the pooling and its sizes, normalisation, the Matryoshka rule, attention (decoders), the
token window, prompts, the instruction template and whether prompts are pooled, EOS and
the padding side. ``Embedder`` holds one; a saved folder's ``embforge.json`` is one
(:meth:`HeadSpec.to_dict`), and so are its ``config.json`` (``head``), an ONNX export's
``embforge_onnx.json`` and what ``embforge serve`` describes. The names of every choice
(poolings, attentions, Matryoshka rules, padding sides) live here, once.

Standard library only: the ONNX Runtime path and a saved folder's remote code read it
without embforge (and without torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

PoolingName = Literal["mean", "cls", "last", "latent", "self_attention"]
HeadInit = Literal["random", "mean"]  # how a new attention head starts (see pooling.AttentionPooling)
AttentionName = Literal["bidirectional", "causal"]
MatryoshkaRule = Literal["truncate", "layer_norm"]
PaddingSide = Literal["left", "right"]

POOLINGS: tuple[str, ...] = get_args(PoolingName)
HEAD_INITS: tuple[str, ...] = get_args(HeadInit)
PARAMETER_FREE_POOLINGS = ("mean", "cls", "last")  # the ones sentence-transformers' Pooling module has
ATTENTIONS: tuple[str, ...] = get_args(AttentionName)
# how embeddings shorten to fewer dimensions: "truncate" then L2, or "layer_norm" (Nomic Embed v1.5:
# non-affine layer norm over all dimensions, truncate, L2; see embedding.matryoshka_norm)
MATRYOSHKA_RULES: tuple[str, ...] = get_args(MatryoshkaRule)
PADDING_SIDES: tuple[str, ...] = get_args(PaddingSide)


class FrozenDict(dict):
    """A dict that refuses changes (a spec's ``pooling`` and ``prompts``); ``dict(d)`` is an editable copy."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a HeadSpec is frozen: make a changed one with spec.replace(...)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # pickle and deepcopy rebuild it whole (dict's own way sets item by item)
        return (type(self), (dict(self),))


@dataclass(frozen=True)
class HeadSpec:
    """How token states become one vector, and how texts become tokens (frozen; see the module docstring).

    Three settings may be left to the model (None) in a spec that has not met its backbone yet;
    ``Embedder`` resolves them and holds the resolved spec: ``max_seq_len`` (the backbone's
    maximum, at most 512), ``add_eos`` (true for decoders) and ``padding_side`` (the tokenizer's).

    Args:
        pooling: the pooler's settings: ``{"name": ...}`` plus the sizes of an attention pooling
            (``pooling.build_pooler``); a name alone is accepted.
        normalize: L2-normalise the embeddings (after any Matryoshka truncation).
        max_seq_len: inputs are truncated to this many tokens (prompt and EOS included).
        prompts: prompt name -> text prepended to inputs, e.g. ``{"query": "search_query: "}``.
        default_prompt_name: the prompt used when a call names none.
        do_lower_case: lower-case prompt and text before tokenising (some sentence-transformers models).
        attention: ``bidirectional`` (a decoder's causal mask removed) or ``causal``; decoders only.
        add_eos: append EOS to every input.
        pool_prompt: false: prompts are instructions, attended to but left out of pooling (NV-Embed).
        padding_side: ``left`` or ``right``.
        instruction_template: how a task instruction becomes a query prompt, e.g.
            ``"Instruct: {instruction}\\nQuery: "``; None: the model takes no instructions.
        matryoshka_rule: one of :data:`MATRYOSHKA_RULES`.
    """

    pooling: dict[str, Any] = field(default_factory=lambda: {"name": "mean"})
    normalize: bool = True
    max_seq_len: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    do_lower_case: bool = False
    attention: AttentionName = "bidirectional"
    add_eos: bool | None = None
    pool_prompt: bool = True
    padding_side: PaddingSide | None = None
    instruction_template: str | None = None
    matryoshka_rule: MatryoshkaRule = "truncate"

    def __post_init__(self):
        pooling = {"name": self.pooling} if isinstance(self.pooling, str) else dict(self.pooling or {})
        pooling.setdefault("name", "mean")
        object.__setattr__(self, "pooling", FrozenDict(pooling))  # own, read-only copies: frozen all through
        object.__setattr__(self, "prompts", FrozenDict(self.prompts or {}))
        problems = []
        for name, value, allowed in (
            ("pooling", pooling["name"], POOLINGS),
            ("attention", self.attention, ATTENTIONS),
            ("matryoshka_rule", self.matryoshka_rule, MATRYOSHKA_RULES),
            ("padding_side", self.padding_side, (*PADDING_SIDES, None)),
        ):
            if value not in allowed:
                problems.append(f"{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or int(self.max_seq_len) < 1):
            problems.append(f"max_seq_len must be a positive number of tokens, got {self.max_seq_len!r}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            problems.append(
                f"default_prompt_name {self.default_prompt_name!r} is not among the prompts {sorted(self.prompts)}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    # ------------------------------------------------------------------ as data
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict, where: str = "head settings") -> HeadSpec:
        """The spec a dict (``embforge.json``, a config's ``head``) describes; unknown keys are an error naming ``where``."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{where}: unknown head settings {unknown}; known: {list(cls.field_names())}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (what ``embforge.json`` holds besides its format and versions)."""
        return {f: _copy(getattr(self, f)) for f in self.field_names()}

    def replace(self, **changes) -> HeadSpec:
        """A copy with ``changes`` (field names) applied and checked."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown head settings {unknown}; known: {list(self.field_names())}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ what it implies
    @property
    def pooling_name(self) -> str:
        return self.pooling["name"]

    @property
    def bidirectional(self) -> bool:
        return self.attention == "bidirectional"

    def fits_sentence_transformers(self) -> bool:
        """Whether sentence-transformers' own modules (Transformer, Pooling, LayerNorm, Normalize) compute
        this head: a parameter-free pooling over every token, no EOS appended, right padding, no instructions."""
        return (
            self.pooling_name in PARAMETER_FREE_POOLINGS
            and len(self.pooling) == 1
            and self.pool_prompt
            and not self.add_eos
            and self.padding_side in (None, "right")
            and self.instruction_template is None
        )

    def prompt(self, prompt_name: str | None = None) -> str:
        """The text of ``prompt_name`` (default: ``default_prompt_name``), "" for none.

        Raises:
            LookupError: an unknown name (naming the model's names).
        """
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise LookupError(f"unknown prompt_name {name!r}; this model has {sorted(self.prompts)}")
        return self.prompts[name]

    def instruction_prompt(self, instruction: str) -> str | None:
        """The query prompt for a task instruction, or None if this model takes no instructions."""
        if self.instruction_template is None:
            return None
        return self.instruction_template.format(instruction=instruction)


def head_of(model) -> HeadSpec | None:
    """An embforge model's head spec (``Embedder``, ``OnnxEmbedder``, a served backend); None for another encoder."""
    head = getattr(model, "head", None)
    return head if isinstance(head, HeadSpec) else None


def prompts_of(model) -> dict[str, str]:
    """A model's named prompts: an embforge model's head's, another encoder's (a SentenceTransformer's) ``prompts``."""
    head = head_of(model)
    return dict(head.prompts if head is not None else getattr(model, "prompts", None) or {})


def instruction_prompt_of(model, instruction: str) -> str | None:
    """The query prompt of a task instruction for ``model`` (None: it takes no instructions)."""
    head = head_of(model)
    return head.instruction_prompt(instruction) if head is not None else None


def _copy(value):
    return dict(value) if isinstance(value, dict) else value
