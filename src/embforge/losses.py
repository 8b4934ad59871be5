"""Contrastive losses as pure functions of embeddings (no models).

Layout of a contrastive batch. Each rank holds B queries, and for every query its
positive and N hard negatives. Documents are embedded as one (B·(1+N), D) block::

    docs = [pos_0 … pos_{B-1} | neg_0,0 … neg_0,N-1 | neg_1,0 … | … neg_{B-1},N-1]

Under torch.distributed the blocks of all R ranks are gathered (with gradient) and
concatenated in rank order, so the candidate documents are (R·B·(1+N), D) and query i of
rank r has its positive at ``r·B·(1+N) + i`` and its negatives at
``r·B·(1+N) + B + i·N + j``. :func:`contrastive_layout` computes these indices; it is the
one place the layout is defined.

Queries with different numbers of negatives (datasets of one stage with their own
``num_negatives``): each rank embeds only the real documents, a compact block
``[pos_0 … pos_{B-1} | the N_0 negatives of query 0 | the N_1 of query 1 | …]``, and
:func:`pad_documents` spreads it into the layout above with N = the stage's largest N_i;
the slots ``j ≥ N_i`` are zero rows that ``Layout.valid`` marks false, so they are never a
candidate (masked before the softmax: no probability, no gradient) for any query of any
rank. With every N_i = N nothing is padded and the layout is the one above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------- gathering


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice.

    Each rank's loss only covers its own queries, but those queries also score every
    other rank's documents; summing the incoming gradients gives each document the
    gradient of the *sum* of all ranks' losses. DDP then averages parameter gradients
    over ranks, so the result is the gradient of the mean loss over the global batch —
    exactly the single-process gradient (tested with 2 gloo processes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)  # (R·M, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (M, …) from all ranks in rank order; identity without distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (for ids, keys and flags)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Indices into the gathered documents for this rank's queries."""

    positive: torch.Tensor  # (B,) index of each query's positive
    own: torch.Tensor  # (B, 1+N) indices of each query's positive and hard negatives (padding slots included)
    valid: torch.Tensor | None = None  # (R·B·(1+N),) false at padding slots; None: no padding


def contrastive_layout(
    batch_size: int,
    num_negatives: int,
    rank: int = 0,
    world: int = 1,
    negative_counts: torch.Tensor | None = None,
) -> Layout:
    """Where rank ``rank``'s queries find their documents after the gather (see module doc).

    Args:
        batch_size: B, queries per rank.
        num_negatives: N, negative slots per query (the largest count when they differ).
        negative_counts: (R·B,) every rank's queries' real negatives (≤ N), in rank order; query
            i of rank r fills its first ``negative_counts[r·B + i]`` slots, the rest are padding.
            None: every query has N.
    """
    B, N = batch_size, num_negatives
    base = rank * B * (1 + N)
    positive = base + torch.arange(B)  # (B,)
    negatives = base + B + torch.arange(B).unsqueeze(1) * N + torch.arange(N).unsqueeze(0)  # (B, N)
    valid = None
    if negative_counts is not None:
        counts = negative_counts.reshape(world, B).cpu()  # (R, B)
        filled = torch.arange(N).view(1, 1, N) < counts.unsqueeze(-1)  # (R, B, N)
        positives = torch.ones(world, B, dtype=torch.bool)  # (R, B)
        valid = torch.cat([positives, filled.reshape(world, B * N)], dim=1).reshape(-1)  # (R·B·(1+N),)
    return Layout(positive=positive, own=torch.cat([positive.unsqueeze(1), negatives], dim=1), valid=valid)


def document_slots(negative_counts: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Where each row of a rank's compact document block goes in its padded block (see module doc).

    Args:
        negative_counts: (B,) real negatives of each query (≤ ``num_negatives``).
        num_negatives: N, slots per query.

    Returns:
        (B + ΣN_i,) int64: positive i -> i; negative j of query i -> B + i·N + j.
    """
    counts = negative_counts.long().cpu()
    B = counts.shape[0]
    query = torch.repeat_interleave(torch.arange(B), counts)  # (ΣN_i,) the query of each negative
    first = torch.cumsum(counts, 0) - counts  # (B,) each query's first negative in the compact block
    j = torch.arange(query.shape[0]) - first[query]  # (ΣN_i,) position among its query's negatives
    return torch.cat([torch.arange(B), B + query * num_negatives + j])


def pad_documents(docs: torch.Tensor, slots: torch.Tensor, size: int, fill: float = 0) -> torch.Tensor:
    """The compact ``docs`` (B + ΣN_i, …) spread to ``slots`` of a (size, …) block, ``fill`` elsewhere.

    Differentiable in ``docs`` only: the padding rows are constants.
    """
    out = docs.new_full((size, *docs.shape[1:]), fill)
    return out.index_copy(0, slots.to(docs.device), docs)  # (size, …)


# ---------------------------------------------------------------------------- InfoNCE


def document_candidates(
    batch_size: int,
    num_documents: int,
    layout: Layout,
    in_batch: torch.Tensor,
    doc_keys: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """(B, M) bool: the documents each query is scored against, its positive included.

    A query's own positive and hard negatives, every real document of the (gathered) batch where its
    ``in_batch`` flag is set, never a padding slot, and never a copy of its positive's text (a false
    negative) other than the positive itself.
    """
    allowed = torch.zeros(batch_size, num_documents, dtype=torch.bool, device=device)
    allowed.scatter_(1, layout.own.to(device), True)
    allowed |= in_batch.unsqueeze(1)
    if layout.valid is not None:  # padding slots are no candidate of any query
        allowed &= layout.valid.to(device).unsqueeze(0)
    if doc_keys is not None:
        positive = layout.positive.to(device)
        duplicate = doc_keys.unsqueeze(0) == doc_keys[positive].unsqueeze(1)  # (B, M)
        duplicate[torch.arange(batch_size, device=device), positive] = False
        allowed &= ~duplicate
    return allowed


def _nce_rows(
    scores: torch.Tensor,
    target: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float,
    false_negative_margin: float | None,
    hardness: float,
) -> torch.Tensor:
    """Mean over rows of -log softmax(scores / τ)[target] over the allowed candidates.

    Args:
        scores: (B, C) similarities (cosine for normalised embeddings).
        target: (B,) the positive's column; ``allowed`` is true there.
        allowed: (B, C) the row's candidates.
        false_negative_margin: a candidate scoring above the positive + this margin is taken for
            an unlabelled positive and left out (decided on detached scores; None: none is).
        hardness: β of hardness weighting: negative c of a row weighs ``n · softmax_c(β·s)`` over
            the row's n negatives (detached), so harder negatives count more and the weights
            average 1; 0 weighs every negative 1.
    """
    B = scores.shape[0]
    rows = torch.arange(B, device=scores.device)
    detached = scores.detach()
    negative = allowed.clone()
    negative[rows, target] = False
    if false_negative_margin is not None:
        negative &= ~(detached > detached[rows, target].unsqueeze(1) + false_negative_margin)
    logits = scores / temperature
    if hardness:
        weighted = (hardness * detached).masked_fill(~negative, float("-inf"))
        count = negative.sum(1, keepdim=True).clamp(min=1)
        log_w = count.log() + weighted - torch.logsumexp(weighted, 1, keepdim=True).clamp(min=-1e30)
        logits = logits + torch.where(negative, log_w, torch.zeros_like(log_w))
    keep = negative
    keep[rows, target] = True
    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, target)


def info_nce(
    queries: torch.Tensor,
    docs: torch.Tensor,
    layout: Layout,
    *,
    temperature: float = 0.02,
    in_batch_negatives: bool | torch.Tensor = True,
    doc_keys: torch.Tensor | None = None,
    query_keys: torch.Tensor | None = None,
    all_queries: torch.Tensor | None = None,
    query_offset: int = 0,
    symmetric: bool = False,
    same_tower: bool = False,
    false_negative_margin: float | None = None,
    hardness: float = 0.0,
) -> torch.Tensor:
    """InfoNCE of each query's positive against its candidates, mean over queries.

    The denominator of query i: its positive and own hard negatives, plus (where in-batch
    negatives are on) every other document of the batch and, with ``same_tower``, every other
    query. Hard negatives only = ``in_batch_negatives=False``.

    Args:
        queries: (B, D) this rank's query embeddings (L2-normalised for cosine).
        docs: (M, D) every candidate document (gathered across ranks).
        layout: indices of each query's positive and own hard negatives in ``docs``, and
            which slots of ``docs`` are padding (never candidates).
        temperature: τ of softmax(q·d / τ).
        in_batch_negatives: bool, or (B,) bool per query. Where false, a query is scored
            only against its own positive and hard negatives (NV-Embed stage 2; datasets
            such as classification pairs whose other in-batch documents may share its label),
            and in the symmetric term its positive sees no other query (that row adds 0).
        doc_keys: (M,) int64 text ids; a candidate whose text equals the query's positive
            (a false negative) is masked out. Also used for the symmetric term.
        query_keys: (B,) int64 text ids of the queries: a query with the same text is never
            a negative (symmetric and same-tower terms).
        all_queries: (Q, D) every query (gathered); needed by ``symmetric`` and ``same_tower``.
        query_offset: index of this rank's first query inside ``all_queries``.
        symmetric: add the document -> query direction and average the two: each positive
            picks its query among all queries (and, with ``same_tower``, against every other
            document).
        same_tower: in-batch negatives from the same side too (GTE's improved contrastive loss):
            the other queries for a query, the other documents for a positive.
        false_negative_margin: leave out candidates scoring above the positive + margin.
        hardness: β of hardness weighting of the negatives (see :func:`_nce_rows`).

    Returns:
        Scalar loss.
    """
    if (symmetric or same_tower) and all_queries is None:
        raise ValueError("info_nce: symmetric and same_tower need all_queries (every query of the batch)")
    B, M, device = queries.shape[0], docs.shape[0], queries.device
    rows = torch.arange(B, device=device)
    in_batch = torch.as_tensor(in_batch_negatives, device=device).expand(B)
    positive = layout.positive.to(device)
    allowed_docs = document_candidates(B, M, layout, in_batch, doc_keys, device)
    other_queries = None
    if all_queries is not None:  # (B, Q): queries of other texts, where in-batch negatives are on
        other_queries = in_batch.unsqueeze(1).expand(B, all_queries.shape[0]).clone()
        other_queries[rows, query_offset + rows] = False
        if query_keys is not None:
            other_queries &= gather_no_grad(query_keys).unsqueeze(0) != query_keys.unsqueeze(1)

    scores, allowed = [queries @ docs.T], [allowed_docs]  # query -> documents
    if same_tower:
        scores.append(queries @ all_queries.T)
        allowed.append(other_queries)
    options = dict(temperature=temperature, false_negative_margin=false_negative_margin, hardness=hardness)
    loss = _nce_rows(torch.cat(scores, 1), positive, torch.cat(allowed, 1), **options)
    if not symmetric:
        return loss
    # document -> query: each query's positive picks that query among all queries; without in-batch
    # negatives the row keeps only its own query (loss 0)
    pos_docs = docs[positive]  # (B, D)
    target = query_offset + rows
    back_ok = other_queries.clone()
    back_ok[rows, target] = True
    scores, allowed = [pos_docs @ all_queries.T], [back_ok]
    if same_tower:  # every other document (not the positive, not a copy of its text)
        others = allowed_docs & in_batch.unsqueeze(1)
        others[rows, positive] = False
        scores.append(pos_docs @ docs.T)
        allowed.append(others)
    return (loss + _nce_rows(torch.cat(scores, 1), target, torch.cat(allowed, 1), **options)) / 2


def spread_out(queries: torch.Tensor, docs: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The global orthogonal regulariser (GOR, Zhang et al. 2017) over non-matching pairs.

    Pushes the similarities of unrelated texts towards the statistics of uniformly spread
    points on the sphere (mean 0, second moment 1/D), which keeps binary and int8 codes
    discriminative: ``mean(s)² + max(0, mean(s²) - 1/D)`` over the pairs.

    Under torch.distributed the moments are over the pairs of every rank (sums gathered with
    gradient), so R ranks give a 1-process run's value and gradients.

    Args:
        queries: (B, D) this rank's queries, docs: (M, D) every candidate document, L2-normalised.
        pairs: (B, M) bool, the non-matching (query, document) pairs.
    """
    s = (queries @ docs.T)[pairs]
    sums = torch.stack([s.sum(), (s**2).sum(), s.new_tensor(float(s.numel()))]).unsqueeze(0)  # (1, 3)
    total = gather_with_grad(sums).sum(0)  # over ranks
    count = total[2].detach().clamp(min=1)
    return (total[0] / count) ** 2 + F.relu(total[1] / count - 1.0 / queries.shape[-1])


# ---------------------------------------------------------------------------- distillation


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """How far the student's embeddings are from the teacher's, mean over rows.

    Args:
        student: (n, D) the student's embeddings (already mapped to the teacher's D where they differ).
        teacher: (n, D) the teacher's, L2-normalised.
        kind: ``cosine``: mean of 1 - cos(s, t); ``mse``: mean squared difference per component.
    """
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"embedding_distance: unknown kind {kind!r} (cosine or mse)")


def similarity_kl(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """KL(teacher ‖ student) of each row's softmax over its allowed candidates, mean over rows.

    Args:
        student_scores / teacher_scores: (B, C) similarities of each query to the candidates.
        allowed: (B, C) bool, the row's candidates (every row has at least one).
        temperature / teacher_temperature: τ of the student's and of the teacher's softmax.
    """
    lowest = torch.finfo(student_scores.dtype).min
    log_s = torch.log_softmax((student_scores / temperature).masked_fill(~allowed, lowest), dim=1)
    log_t = torch.log_softmax((teacher_scores / teacher_temperature).masked_fill(~allowed, lowest), dim=1)
    terms = torch.where(allowed, log_t.exp() * (log_t - log_s), torch.zeros_like(log_s))
    return terms.sum(1).mean()


# ---------------------------------------------------------------------------- Matryoshka


def matryoshka(
    loss_fn: Callable[..., torch.Tensor],
    tensors: Sequence[torch.Tensor | None],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` on the first d components (re-normalised) for each d in ``dims``.

    Args:
        loss_fn: called as ``loss_fn(*truncated)`` with every tensor cut to (…, d) and
            L2-normalised (``None`` entries passed through), returns a scalar.
        tensors: full embeddings, e.g. ``(queries (B, D), docs (M, D))``.
        dims: prefix lengths, e.g. [768, 512, 256, 128, 64] (Nomic v1.5).
        weights: one per dim (default: all 1, as in Nomic v1.5).
    """
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka: {len(dims)} dims but {len(weights)} weights")
    total = None
    for d, w in zip(dims, weights):
        cut = [None if t is None else F.normalize(t[..., :d], dim=-1) for t in tensors]
        term = w * loss_fn(*cut)
        total = term if total is None else total + term
    return total
