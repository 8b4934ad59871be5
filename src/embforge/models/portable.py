"""The embedding model's forward pass, in one self-contained file (torch + transformers only).

embforge uses this module directly, and :meth:`Embedder.save` copies it into every saved
model folder as ``embforge_modeling.py``, so the folder loads without embforge installed::

    AutoModel.from_pretrained(folder, trust_remote_code=True)            # EmbforgeModel
    SentenceTransformer(folder, trust_remote_code=True)                  # EmbforgeSTModule

It holds the parts that must compute the same thing everywhere:

- **attention** (:func:`backbone_forward`): decoder LLMs run with the causal mask removed
  (every token attends to every non-pad token) or kept, for left and right padding;
- **poolings**: mean / cls / last token, latent attention (NV-Embed) and self-attention;
- **tokenisation** (:func:`tokenize_texts`, :func:`pad_batch`): prompt + text, EOS appended,
  and a *pooling mask* that drops pad tokens and, for instruction prompts, the prompt;
- **unpadded encoders** (:func:`unpadded_forward`): BERT-family and nomic-bert backbones run
  on the real tokens only, packed into one sequence, with variable-length attention.

Instruction span rule (documented in docs/models.md, tested in tests/unit/models/):
the prompt is tokenised *inside* the full string, and a leading token belongs to the
instruction iff all of its characters lie inside the prompt (offset end <= len(prompt));
leading special tokens (BOS/CLS) count as instruction when there is a prompt. A token that
straddles the boundary (e.g. "▁how" eating the prompt's trailing space) is content.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# model_type of decoder-only LLMs whose causal mask embforge knows how to remove
DECODER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})
POOLING_NAMES = ("mean", "cls", "last", "latent", "self_attention")
MODELING_FILE = "embforge_modeling.py"  # the name this file gets inside a saved model folder


def is_decoder(config) -> bool:
    """True for the decoder-only LLM families in :data:`DECODER_MODEL_TYPES`."""
    return getattr(config, "model_type", None) in DECODER_MODEL_TYPES


# ============================================================================ attention
def backbone_forward(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    bidirectional: bool,
    unpad: bool | None = None,
    **extra,
) -> torch.Tensor:
    """Run a transformers backbone and return its last hidden states (B, T, D).

    This is the one place that decides how a backbone attends. Encoders of
    :data:`UNPAD_MODEL_TYPES` and decoders, with SDPA attention, run unpadded
    (:func:`unpadded_forward`: no compute on pad tokens) when ``unpad`` is true, or by
    default (None) whenever the batch has padding or the backbone is in training mode;
    other encoders get the usual 2-D padding mask. For decoders, position ids are counted
    over real tokens (so left and right padding give the same states), and with
    ``bidirectional`` every token sees every non-pad token (padded: a 4-D mask, which
    transformers uses as is; unpadded: no causal mask within a sequence). Pad positions of the result hold zeros (unpadded) or
    the model's states (padded); poolings never read them.
    """
    if not is_decoder(backbone.config):
        if unpad is None:
            # in training too without pads: the packed path's attention has the cheaper CPU dropout
            unpad = supports_unpadding(backbone) and (backbone.training or not bool(attention_mask.bool().all()))
        if unpad:
            return unpadded_forward(backbone, input_ids, attention_mask, **extra)
        if backbone.config.model_type in ROTARY_ENCODER_TYPES and "position_ids" not in extra:
            extra = {**extra, "position_ids": encoder_positions(backbone, attention_mask)}
        return backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    if unpad is None:
        unpad = supports_unpadding(backbone) and (backbone.training or not bool(attention_mask.bool().all()))
    if unpad:
        return unpadded_forward(backbone, input_ids, attention_mask, causal=not bidirectional, **extra)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    mask = attention_mask
    if bidirectional:
        impl = getattr(backbone.config, "_attn_implementation", "eager") or "eager"
        # an earlier unpadded call switched an SDPA backbone to VARLEN_ATTENTION for good; its
        # padded calls are transformers' SDPA attention, so they take SDPA's boolean mask
        if impl not in ("eager", "sdpa", VARLEN_ATTENTION):
            raise NotImplementedError(f"bidirectional attention supports eager and sdpa, not {impl!r}")
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys every query may attend to
        keep = keep.expand(-1, 1, attention_mask.shape[1], -1)  # (B, 1, T, T)
        if impl != "eager":
            mask = keep
        else:  # eager adds the mask to the scores
            dtype = next(backbone.parameters()).dtype
            mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    out = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
    return out.last_hidden_state


# ============================================================================ dropout
# CPU dropout at a third of the cost of F.dropout, same distribution. PyTorch's CPU dropout draws
# float Bernoulli noise (``bernoulli_``: about 6 ns per element on a 2-core AVX512 machine),
# divides it by the keep probability and multiplies; training the packaged MiniLM that was
# 15 % of a step, mostly on the attention probabilities (B x heads x T x T). Here the mask
# comes from uniform 32-bit draws (one ``random_`` call fills int64 words, two draws each:
# about 2 ns per element): an element is dropped when its draw is among the lowest
# round(p * 2^32) of the 2^32 values, so the drop probability is p within 2^-33 (torch.rand's
# float32 uniforms resolve 2^-24). Survivors are scaled by 1 / (1 - p) as in PyTorch, and the
# mask is kept as bool for the backward pass (a quarter of the float noise's memory). Draws
# come from PyTorch's default CPU generator: torch.manual_seed and saved RNG states repeat runs
# exactly. On other devices (CUDA has fused dropout kernels) this is F.dropout.
_INT32_MIN = -(2**31)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each element True with probability ``1 - p`` (within 2^-33)."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # every 64-bit value equally likely
    draws = words.view(torch.int32)[:n]  # two uniform 32-bit draws per word
    return (draws >= _INT32_MIN + round(p * 2**32)).view(shape)


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale, with the bool mask saved for the backward pass."""

    @staticmethod
    def noise(mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        # through uint8: bool -> float converts about 2.5x slower, and float * bool 8x slower than float * float
        return mask.view(torch.uint8).to(dtype).mul_(scale)

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * _MaskedScale.noise(mask, scale, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * _MaskedScale.noise(mask, ctx.scale, grad.dtype), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with a cheaper mask on CPU (see this section's comment)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` running :func:`dropout` (an instance of ``nn.Dropout``, same ``p``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # nobody in transformers' encoders asks for it; keep PyTorch's semantics
            return super().forward(x)
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` under ``module`` for :class:`Dropout`; return how many."""
    swapped = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped


def dropout_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with dropout on the probabilities, for CPU training.

    PyTorch's fused CPU attention has no dropout, so with dropout SDPA falls back to its
    math path; this is that path with :func:`dropout`'s cheaper mask and a plain additive
    key mask. query/key/value (B, H, T, Dh); ``key_mask`` bool, broadcastable to
    (B, H, T, T), True where attention may look (or None). Returns (B, H, T, Dh).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (B, H, T, T)
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~key_mask, torch.finfo(scores.dtype).min)
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p, True)
    return torch.matmul(probs, value)  # (B, H, T, Dh)


# ============================================================================ unpadded encoders
# Encoder families whose layers pass attention keyword arguments through to the attention
# function and whose positions are the padded layout's column index (BERT family: absolute
# position embeddings; nomic-bert: rotary). Unpadding them changes nothing but the cost.
UNPAD_MODEL_TYPES = frozenset({"bert", "nomic_bert"})
ROTARY_ENCODER_TYPES = frozenset({"nomic_bert"})  # positions only enter attention, through rotary embeddings
VARLEN_ATTENTION = "embforge_varlen"  # the name our attention function is registered under in transformers


PACK_MULTIPLE = 64  # packed lengths are rounded up to a multiple of this (see PackedBatch)
ATTENTION_BUCKETS = 4  # at most this many length buckets per packed attention call (see length_buckets)


def length_buckets(lengths: Sequence[int], max_buckets: int = ATTENTION_BUCKETS) -> list[tuple[list[int], int]]:
    """Rows grouped by length for attention: [(rows, padded length)], at most ``max_buckets`` groups.

    Attention costs about rows x length^2 per group (the score matrix), so the groups are
    the split of the length-sorted rows that minimises the sum of that area (dynamic
    programming over lengths rounded up to a grid of 1/64 of the longest, at least 8:
    few distinct tensor sizes, and a small table). Rows of length 0 are left out.
    Measured on NQ passages (batch 32, max length 128): 4 groups cover 74 % of the area
    one padded block does (the unreachable floor, every row on its own: 69 %).
    """
    rows = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    if not rows:
        return []
    step = max(8, -(-lengths[rows[0]] // 64))
    cap = lengths[rows[0]]
    padded = [min(-(-lengths[i] // step) * step, cap) for i in rows]  # non-increasing
    starts = [j for j in range(len(rows)) if j == 0 or padded[j] != padded[j - 1]]  # a group starts at a new length
    n = len(rows)
    bounds = [*starts, n]
    # best[k][a]: least area covering rows[bounds[a]:] with k groups; a group spans bounds[a]..bounds[b]
    inf = float("inf")
    best = [[inf] * len(bounds) for _ in range(max_buckets + 1)]
    cut = [[0] * len(bounds) for _ in range(max_buckets + 1)]
    best[0][-1] = 0
    for k in range(1, max_buckets + 1):
        best[k][-1] = 0
        for a in range(len(starts) - 1, -1, -1):
            width = padded[bounds[a]] ** 2
            for b in range(a + 1, len(bounds)):
                area = (bounds[b] - bounds[a]) * width + best[k - 1][b]
                if area < best[k][a]:
                    best[k][a], cut[k][a] = area, b
    groups, a, k = [], 0, max_buckets
    while a < len(starts):
        b = cut[k][a]
        groups.append((rows[bounds[a] : bounds[b]], padded[bounds[a]]))
        a, k = b, k - 1
    return groups


class _Bucket:
    """One attention group of a :class:`PackedBatch`: b rows padded to length t."""

    def __init__(self, rows: list[int], t: int, lengths: torch.Tensor, starts: torch.Tensor, causal: bool = False):
        rows_t = torch.tensor(rows, device=lengths.device)
        lens, first = lengths[rows_t][:, None], starts[rows_t][:, None]  # (b, 1)
        cols = torch.arange(t, device=lengths.device)[None]  # (1, t)
        real = cols < lens  # (b, t)
        self.shape = (len(rows), t)
        self.index = torch.where(real, first + cols, first).flatten()  # (b·t,) packed token per slot; pads repeat one
        self.full = bool(real.all())  # no pads: every slot's output kept
        self.key_mask = None if self.full else real[:, None, None, :]  # (b, 1, 1, t); None: no mask
        if causal:  # a sequence's tokens sit in order from column 0: causal = lower triangle
            tril = torch.ones(t, t, dtype=torch.bool, device=lengths.device).tril()  # (t, t)
            self.key_mask = tril[None, None] if self.key_mask is None else self.key_mask & tril  # (b|1, 1, t, t)
        self.real = real.flatten().nonzero().squeeze(1)  # (n,) slots holding real tokens
        self.packed = self.index[self.real]  # (n,) their packed positions

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, Dh) packed -> (b, H, t, Dh)."""
        return x.index_select(0, self.index).view(*self.shape, *x.shape[1:]).transpose(1, 2)

    def real_rows(self, out: torch.Tensor) -> torch.Tensor:
        """(b, H, t, Dh) -> (n, H, Dh): the outputs of real tokens, in :attr:`packed` order."""
        flat = out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])  # (b·t, H, Dh)
        return flat if self.full else flat.index_select(0, self.real)


class PackedBatch:
    """Where the tokens of a padded (B, T) batch sit once packed into one sequence of N tokens.

    The N packed tokens are the ``num_real`` real tokens (row-major), then as many pad
    positions as round N up to a multiple of ``multiple`` (while the batch has pads): a
    few wasted rows buy a small set of distinct tensor sizes, where exact lengths would
    give every batch new ones — the allocator then keeps freed blocks of every size.
    Measured (MiniLM, batch 1024, GradCache chunks of 32, 2 steps, `bench/train.py`'s
    worker): peak RSS 3,844 MB with exact lengths, 2,663 MB with multiples of 64; samples/s
    at batch 32 unchanged within run-to-run noise. Pad rows get zeros from attention and
    are dropped by :meth:`unpack_real`.

    Attention runs per length bucket (:func:`length_buckets`): each bucket's rows are
    gathered into a (b, H, t, Dh) block padded to the bucket's length only.

    Attributes:
        indices: (N,) positions of the packed tokens in the flattened (B·T) batch.
        num_real: the number of real tokens (the first ``num_real`` of ``indices``).
        buckets: the attention groups.
        causal: each token attends to its own sequence's earlier tokens only (decoders with
            the causal mask kept); else to its whole sequence.
        order: (num_real,) packed position of each bucket output row, buckets concatenated.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor,
        multiple: int = PACK_MULTIPLE,
        max_buckets: int = ATTENTION_BUCKETS,
        causal: bool = False,
    ):
        self.causal = causal
        keep = attention_mask.bool().flatten()  # (B·T,)
        self.batch, self.seq_len = attention_mask.shape
        real = keep.nonzero().squeeze(1)  # (num_real,)
        self.num_real = real.numel()
        extra = min(-self.num_real % multiple, keep.numel() - self.num_real)
        pads = (~keep).nonzero().squeeze(1)[:extra]  # (extra,)
        self.indices = torch.cat([real, pads])  # (N,)
        lengths = attention_mask.bool().sum(1)  # (B,)
        starts = lengths.cumsum(0) - lengths  # (B,) packed position of each row's first token
        groups = length_buckets(lengths.tolist(), max_buckets)
        self.buckets = [_Bucket(rows, t, lengths, starts, causal) for rows, t in groups]
        self.order = torch.cat([b.packed for b in self.buckets]) if self.buckets else real

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the packed tokens."""
        return x.reshape(self.batch * self.seq_len, *x.shape[2:])[self.indices]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros where nothing was packed (differentiable)."""
        out = x.new_zeros(self.batch * self.seq_len, *x.shape[1:])  # (B·T, ...)
        return out.index_copy(0, self.indices[: x.shape[0]], x).view(self.batch, self.seq_len, *x.shape[1:])

    def unpack_real(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), the real tokens' rows only: zeros at every pad (differentiable)."""
        return self.unpack(x[: self.num_real])


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function for packed sequences (registered as :data:`VARLEN_ATTENTION`).

    With ``embforge_packed`` (a :class:`PackedBatch`) in the keyword arguments, ``query``,
    ``key`` and ``value`` are (1, H, N, Dh) packed tokens: each length bucket's rows are
    gathered into a (b, H, t, Dh) block for one SDPA call (with a key-padding mask where
    the block has pads), and the real rows' outputs go back to their packed positions.
    Only attention, whose cost is small next to the projections and the MLP, sees padding,
    and only up to its bucket's length; every other layer runs on N tokens. Measured on CPU
    (torch 2.13), padded blocks beat a per-sequence SDPA loop about 2x, and nested-tensor
    SDPA has no CPU kernel. With dropout on CPU, :func:`dropout_attention` replaces SDPA's
    math path. Without it (a padded call), this is transformers' own SDPA attention.

    Returns:
        ((1, N, H, Dh) or (B, T, H, Dh) attention output, None)
    """
    packed = kwargs.pop("embforge_packed", None)
    if packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q_all, k_all, v_all = (x[0].transpose(0, 1) for x in (query, key, value))  # (N, H, Dh); k, v: H_kv heads
    groups = q_all.shape[1] // k_all.shape[1]  # grouped-query attention: query heads per key/value head
    outs = []
    for bucket in packed.buckets:
        q, k, v = bucket.gather(q_all), bucket.gather(k_all), bucket.gather(v_all)  # (b, H | H_kv, t, Dh)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (b, H, t, Dh)
        if dropout > 0.0 and q.device.type == "cpu":  # SDPA's CPU kernel has no dropout: its math path, cheaper
            out = dropout_attention(q, k, v, bucket.key_mask, dropout, scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.key_mask, dropout_p=dropout, scale=scaling)
        outs.append(bucket.real_rows(out))  # (n, H, Dh)
    out = q_all.new_zeros(q_all.shape).index_copy(0, packed.order, torch.cat(outs))  # (N, H, Dh); pad rows 0
    return out.unsqueeze(0), None  # (1, N, H, Dh)


def _use_varlen_attention(config) -> None:
    """Register :func:`varlen_attention` with transformers and switch ``config`` (an SDPA encoder) to it.

    Permanent on purpose: a gradient-checkpointed layer recomputes its forward during the
    backward pass, after this call returned. Padded calls still get transformers' SDPA mask
    and SDPA itself. ``_attn_implementation`` is not written to saved configs.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if VARLEN_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, sdpa_mask)
    config._attn_implementation = VARLEN_ATTENTION


def encoder_positions(backbone: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) of an encoder batch, the same padded or unpadded.

    Absolute-position encoders (BERT): the column, as transformers numbers them. Rotary
    encoders (:data:`ROTARY_ENCODER_TYPES`) and decoders: the rank among the row's real tokens, pads
    repeating a neighbour's — attention scores only see position differences, and a
    length-dependent rotary scaling (dynamic NTK) then sees each text's own length
    (whatever it is batched with) and the same one for left and right padding.
    """
    B, T = attention_mask.shape
    if backbone.config.model_type in ROTARY_ENCODER_TYPES or is_decoder(backbone.config):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return torch.arange(T, device=attention_mask.device).expand(B, T)  # (B, T)


def supports_unpadding(backbone: nn.Module) -> bool:
    """True for encoders of :data:`UNPAD_MODEL_TYPES` and for decoders (:data:`DECODER_MODEL_TYPES`)
    that attend with SDPA (or already unpadded)."""
    config = backbone.config
    family = config.model_type in UNPAD_MODEL_TYPES or is_decoder(config)
    return family and config._attn_implementation in ("sdpa", VARLEN_ATTENTION)


def unpadded_forward(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool = False, **extra
) -> torch.Tensor:
    """Run a backbone on the real tokens only; return (B, T, D) last hidden states, zeros at pads.

    The batch is packed into one (1, N) sequence; every token keeps the position id the
    padded path gives it (:func:`encoder_positions`; decoders count positions over real
    tokens), and attention stays within each sequence (:func:`varlen_attention`; ``causal``:
    within its earlier tokens), so the result equals the padded forward's on real tokens.
    Per-token extra inputs (``token_type_ids``) are packed alike.

    Raises:
        ValueError: the backbone is neither an encoder of :data:`UNPAD_MODEL_TYPES` nor a
            decoder, with sdpa attention.
    """
    if not supports_unpadding(backbone):
        config = backbone.config
        raise ValueError(
            f"unpadded attention supports {sorted(UNPAD_MODEL_TYPES)} and decoders "
            f"({sorted(DECODER_MODEL_TYPES)}) with sdpa attention, "
            f"not {config.model_type!r} with {config._attn_implementation!r}"
        )
    _use_varlen_attention(backbone.config)
    decoder = is_decoder(backbone.config)
    packed = PackedBatch(attention_mask, causal=causal)
    B, T = input_ids.shape
    positions = extra.pop("position_ids", None)
    positions = encoder_positions(backbone, attention_mask) if positions is None else positions  # (B, T)
    extra = {k: packed.pack(v)[None] if torch.is_tensor(v) and v.shape[:2] == (B, T) else v for k, v in extra.items()}
    packed_positions = packed.pack(positions)  # (N,)
    # pad rows get position 0: a length-dependent rotary scaling (dynamic NTK) reads a sequence's
    # length off its increasing positions, and pad rows carrying a long row's positions at the end
    # would otherwise lengthen the last text
    packed_positions[packed.num_real :] = 0
    if decoder:  # an already-4-D mask stops transformers building an (N, N) one, which varlen_attention ignores
        extra = {**extra, "use_cache": False, "attention_mask": attention_mask.new_ones(1, 1, 1, 1, dtype=torch.bool)}
    else:
        extra = {**extra, "attention_mask": None}
    out = backbone(
        input_ids=packed.pack(input_ids)[None],  # (1, N)
        position_ids=packed_positions[None],  # (1, N)
        embforge_packed=packed,
        **extra,
    )
    return packed.unpack_real(out.last_hidden_state[0])  # (B, T, D)


# ============================================================================ poolings
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the masked token states. hidden (B, T, D), mask (B, T) -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, D)
    # clamp: an all-masked row gives zeros instead of NaN
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first counted token (the [CLS] of BERT inputs). -> (B, D)"""
    first = mask.long().argmax(dim=1)  # (B,) index of the first 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last counted token (EOS for decoders), for left or right padding. -> (B, D)"""
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


_PARAMETER_FREE = {"mean": mean_pool, "cls": cls_pool, "last": last_pool}


class Pooling(nn.Module):
    """A parameter-free pooling chosen by name (``mean``, ``cls`` or ``last``)."""

    def __init__(self, name: str = "mean"):
        super().__init__()
        if name not in _PARAMETER_FREE:
            raise ValueError(f"unknown parameter-free pooling {name!r}; choose one of {sorted(_PARAMETER_FREE)}")
        self.name = name

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _PARAMETER_FREE[self.name](hidden, mask)

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class GEGLU(nn.Module):
    """x, gate = split(x); x * gelu(gate). (B, T, 2F) -> (B, T, F)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class AttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling (or, without latents, a self-attention ablation).

    The token states are the queries. With ``num_latents`` a trainable latent array
    (K, D) is both keys and values (NV-Embed); with ``num_latents=None`` the token states
    themselves are keys and values (pad keys masked). Then, as in the released model:
    pre-LayerNorm + multi-head attention + residual, pre-LayerNorm + GEGLU feed-forward
    (``mlp_ratio`` x width, with biases) + residual, mean over the pooling mask.

    NV-Embed preset at D = 4096: 512 latents, 8 heads x head_dim 4096 -> 740,356,096 parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_latents: int | None = 512,
        num_heads: int = 8,
        head_dim: int | None = None,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.hidden_size, self.num_latents, self.num_heads = hidden_size, num_latents, num_heads
        self.head_dim = head_dim or hidden_size
        self.mlp_ratio = mlp_ratio
        inner = num_heads * self.head_dim
        self.norm = nn.LayerNorm(hidden_size)  # on the token states (queries)
        self.norm_context = nn.LayerNorm(hidden_size)  # on the latents (keys/values)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.norm_ff = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(
            nn.Linear(hidden_size, 2 * mlp_ratio * hidden_size),
            GEGLU(),
            nn.Linear(mlp_ratio * hidden_size, hidden_size),
        )
        if num_latents:
            self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))

    @property
    def name(self) -> str:
        return "latent" if self.num_latents else "self_attention"

    def config(self) -> dict:
        return {
            "name": self.name,
            "num_latents": self.num_latents,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "mlp_ratio": self.mlp_ratio,
        }

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """hidden (B, T, D), mask (B, T) pooling mask, attention_mask (B, T) non-pad -> (B, D)."""
        if self.num_latents and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return self._latent_forward(hidden, mask)  # the same result, pooled tokens only (exports trace this path)
        B, T, _ = hidden.shape
        H, Dh = self.num_heads, self.head_dim
        x = self.norm(hidden)
        key_mask = None
        if self.num_latents:
            context = self.norm_context(self.latents).unsqueeze(0).expand(B, -1, -1)  # (B, K, D)
        else:  # self-attention: the tokens are keys and values too, pad keys masked
            context = self.norm_context(hidden)  # (B, T, D)
            if attention_mask is not None:
                key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        q = self.to_q(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, K, H·Dh) each
        k = k.reshape(B, -1, H, Dh).transpose(1, 2)  # (B, H, K, Dh)
        v = v.reshape(B, -1, H, Dh).transpose(1, 2)  # (B, H, K, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, Dh)
        hidden = self.to_out(attn.transpose(1, 2).reshape(B, T, H * Dh)) + hidden  # (B, T, D)
        hidden = self.ff(self.norm_ff(hidden)) + hidden  # (B, T, D)
        return mean_pool(hidden, mask)

    def _latent_forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latent attention on the pooled tokens only.

        Every token attends to the latents, never to another token, so a token's output
        depends on its own state alone: the pad and instruction positions, which the mean
        leaves out, are not computed at all (same result as computing them; with right-padded
        batches most positions are pads). The pooled tokens are packed (N, D), run through
        attention and feed-forward, and averaged back per row.
        """
        B, _, D = hidden.shape
        H, Dh = self.num_heads, self.head_dim
        keep = mask.bool()
        rows = keep.nonzero()[:, 0]  # (N,) row of each pooled token
        tokens = hidden[keep]  # (N, D)
        context = self.norm_context(self.latents)  # (K, D)
        q = self.to_q(self.norm(tokens)).view(-1, H, Dh).transpose(0, 1)  # (H, N, Dh)
        k, v = (t.view(-1, H, Dh).transpose(0, 1) for t in self.to_kv(context).chunk(2, dim=-1))  # (H, K, Dh)
        attn = F.scaled_dot_product_attention(q, k, v)  # (H, N, Dh)
        tokens = self.to_out(attn.transpose(0, 1).reshape(-1, H * Dh)) + tokens  # (N, D)
        tokens = self.ff(self.norm_ff(tokens)) + tokens  # (N, D)
        summed = tokens.new_zeros(B, D).index_add_(0, rows, tokens)
        counts = keep.sum(dim=1, keepdim=True).to(tokens.dtype).clamp(min=1e-9)  # an empty row gives zeros
        return summed / counts


def build_pooler(cfg: dict, hidden_size: int) -> nn.Module:
    """A pooler from its config dict, e.g. ``{"name": "latent", "num_latents": 512, "head_dim": 64}``."""
    cfg = dict(cfg)
    name = cfg.pop("name", "mean")
    if name in _PARAMETER_FREE:
        if cfg:
            raise ValueError(f"pooling {name!r} takes no settings, got {sorted(cfg)}")
        return Pooling(name)
    if name == "latent":
        return AttentionPooling(hidden_size, **cfg)
    if name == "self_attention":
        cfg.pop("num_latents", None)
        return AttentionPooling(hidden_size, num_latents=None, **cfg)
    raise ValueError(f"unknown pooling {name!r}; choose one of {POOLING_NAMES}")


def pool(pooler: nn.Module, hidden: torch.Tensor, pooling_mask: torch.Tensor, attention_mask: torch.Tensor):
    """Apply any pooler with the one signature all poolings share. -> (B, D)"""
    if isinstance(pooler, AttentionPooling):
        return pooler(hidden, pooling_mask, attention_mask)
    return pooler(hidden, pooling_mask)


# ============================================================================ tokenisation
def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    prompts: Sequence[str],
    *,
    max_len: int,
    add_eos: bool = False,
    pool_prompt: bool = True,
    lower_case: bool = False,
) -> tuple[list[list[int]], list[int]]:
    """Prompt + text -> unpadded token ids and, per text, how many leading tokens to leave out of pooling.

    Args:
        tokenizer: a fast transformers tokenizer (offsets are needed for the instruction span).
        texts / prompts: one prompt per text ("" for none).
        max_len: total length cap, EOS included.
        add_eos: append the EOS token (decoder embedding models pool over it).
        pool_prompt: False: the prompt is an instruction, attended to but not pooled.
        lower_case: lower-case prompt and text first (some sentence-transformers models).

    Returns:
        (ids, excluded): token id lists and the count of leading instruction tokens.
    """
    if lower_case:
        prompts = [p.lower() for p in prompts]
        texts = [t.lower() for t in texts]
    full = [p + t for p, t in zip(prompts, texts)]
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError("add_eos is set but the tokenizer has no EOS token")
    need_offsets = not pool_prompt and any(prompts)
    enc = tokenizer(
        full,
        truncation=True,
        max_length=max_len - (1 if add_eos else 0),
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_offsets_mapping=need_offsets,
    )
    ids = [list(x) for x in enc["input_ids"]]
    if eos is not None:
        ids = [x if x and x[-1] == eos else x + [eos] for x in ids]
    excluded = [0] * len(ids)
    if need_offsets:
        for i, (prompt, offsets) in enumerate(zip(prompts, enc["offset_mapping"])):
            if prompt:
                n = 0
                while n < len(offsets) and offsets[n][1] <= len(prompt):
                    n += 1
                excluded[i] = n
    return ids, excluded


def pad_batch(
    tokenizer, ids: Sequence[Sequence[int]], excluded: Sequence[int], *, device=None
) -> dict[str, torch.Tensor]:
    """Pad with the tokenizer's own ``pad`` (its padding side) and add the pooling mask.

    The pooling mask keeps real tokens whose rank among the real tokens is at least the
    row's instruction length, so it is right for left and right padding alike.

    Returns:
        ``input_ids``, ``attention_mask`` and ``pooling_mask``, each (B, T).
    """
    batch = tokenizer.pad({"input_ids": [list(x) for x in ids]}, padding=True, return_tensors="pt")
    attention_mask = batch["attention_mask"]
    rank = attention_mask.cumsum(-1) - 1  # (B, T) position among the real tokens
    start = torch.tensor(list(excluded), dtype=torch.long).unsqueeze(1)  # (B, 1)
    pooling_mask = attention_mask * (rank >= start).long()  # (B, T)
    out = {"input_ids": batch["input_ids"], "attention_mask": attention_mask, "pooling_mask": pooling_mask}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# ============================================================================ the model
def embed(
    backbone: nn.Module,
    pooler: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling_mask: torch.Tensor | None = None,
    *,
    bidirectional: bool = True,
    normalize: bool = True,
    matryoshka_rule: str = "truncate",
    unpad: bool | None = None,
    **extra,
) -> torch.Tensor:
    """Tokenised batch -> embeddings (B, D): backbone, pooling over ``pooling_mask``, L2 norm.

    Args:
        matryoshka_rule: ``truncate`` (pooled vectors as they are) or ``layer_norm``
            (:func:`matryoshka_norm` on the pooled vectors before L2 normalisation).
        unpad: run the encoder on real tokens only (None: wherever supported, see :func:`backbone_forward`).
    """
    hidden = backbone_forward(backbone, input_ids, attention_mask, bidirectional=bidirectional, unpad=unpad, **extra)
    pooled = pool(pooler, hidden, attention_mask if pooling_mask is None else pooling_mask, attention_mask)
    pooled = matryoshka_norm(pooled, matryoshka_rule)
    return F.normalize(pooled, dim=-1) if normalize else pooled


MATRYOSHKA_RULES = ("truncate", "layer_norm")


def matryoshka_norm(pooled: torch.Tensor, rule: str) -> torch.Tensor:
    """What comes between pooling and truncation to fewer dimensions. (B, D) -> (B, D)

    ``truncate``: nothing (truncate, then L2-normalise). ``layer_norm``: Nomic Embed v1.5's
    inference rule (arXiv 2402.01613, v1.5 model card): a non-affine layer norm over all D
    components (eps 1e-5), then truncate, then L2-normalise; full-size embeddings get the
    layer norm too. A sentence-transformers folder expresses it as a ``LayerNorm`` module
    with unit weight and zero bias before ``Normalize``, so its ``truncate_dim`` agrees.
    """
    if rule == "truncate":
        return pooled
    if rule == "layer_norm":
        return F.layer_norm(pooled, pooled.shape[-1:])
    raise ValueError(f"unknown matryoshka_rule {rule!r}; choose one of {MATRYOSHKA_RULES}")


def _embforge_classes():
    """EmbforgeConfig / EmbforgeModel, defined lazily so importing this file stays light."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput

    class EmbforgeConfig(PretrainedConfig):
        """A backbone config (nested) + the embedding head's settings."""

        model_type = "embforge"

        def __init__(
            self,
            backbone: dict | None = None,
            pooling: dict | None = None,
            bidirectional: bool = True,
            normalize: bool = True,
            add_eos: bool = False,
            pool_prompt: bool = True,
            matryoshka_rule: str = "truncate",
            **kwargs,
        ):
            self.backbone = dict(backbone or {})
            self.pooling = dict(pooling or {"name": "mean"})
            self.bidirectional = bidirectional
            self.normalize = normalize
            self.matryoshka_rule = matryoshka_rule
            self.add_eos = add_eos
            self.pool_prompt = pool_prompt
            super().__init__(**kwargs)

        def backbone_config(self):
            cfg = dict(self.backbone)
            return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    class EmbforgeModel(PreTrainedModel):
        """``backbone`` + ``pooler``: ``forward(input_ids, attention_mask, pooling_mask)`` -> embeddings."""

        config_class = EmbforgeConfig
        base_model_prefix = "embforge"
        _supports_sdpa = True

        def __init__(self, config: EmbforgeConfig):
            super().__init__(config)
            bb_cfg = config.backbone_config()
            self.backbone = AutoModel.from_config(bb_cfg)
            self.pooler = build_pooler(config.pooling, bb_cfg.hidden_size)
            self.post_init()

        def _init_weights(self, module):
            # the backbone (re)builds its own modules, e.g. rotary frequencies after a meta-device
            # load; the pooler's weights always come from the checkpoint
            backbone = getattr(self, "backbone", None)
            if backbone is not None and module is not self:
                backbone._init_weights(module)

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

    return EmbforgeConfig, EmbforgeModel


def __getattr__(name: str):  # module-level lazy attributes (PEP 562) for transformers' auto_map
    if name in ("EmbforgeConfig", "EmbforgeModel"):
        config_cls, model_cls = _embforge_classes()
        globals().update(EmbforgeConfig=config_cls, EmbforgeModel=model_cls)
        return globals()[name]
    raise AttributeError(name)


class EmbforgeSTModule(nn.Module):
    """The whole embforge pipeline as one sentence-transformers module (prompt-aware tokenisation)."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        with open(os.path.join(folder, "embforge.json"), encoding="utf-8") as f:
            self.settings = json.load(f)
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # needs no code
        self.max_seq_length = int(self.settings["max_seq_len"])

    @staticmethod
    def load(input_path: str) -> EmbforgeSTModule:
        return EmbforgeSTModule(input_path)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        ids, excluded = tokenize_texts(
            self.tokenizer,
            list(inputs),
            [prompt or ""] * len(inputs),
            max_len=self.max_seq_length,
            add_eos=cfg.add_eos,
            pool_prompt=cfg.pool_prompt,
            lower_case=self.settings.get("do_lower_case", False),
        )
        return pad_batch(self.tokenizer, ids, excluded)

    tokenize = preprocess

    def forward(self, features: dict, **kwargs) -> dict:
        emb = self.model(features["input_ids"], features["attention_mask"], features.get("pooling_mask")).embeddings
        features["sentence_embedding"] = emb
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.model.config.backbone_config().hidden_size)

    def save(self, output_path: str, *args, **kwargs) -> None:
        raise NotImplementedError("save this model with embforge (Embedder.save), which writes every file it needs")


def num_parameters(module: nn.Module) -> int:
    """Parameter count (works on the meta device; shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += math.prod(p.shape)
    return total
