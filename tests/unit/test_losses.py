"""Losses against naive per-query loops on plain tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from embforge.losses import contrastive_layout, document_candidates, info_nce, matryoshka, spread_out


def naive_info_nce(q, docs, B, N, tau, in_batch, doc_keys=None):
    """Every query with N hard negatives (the layout's row-major block)."""
    return naive_ragged_info_nce(q, docs, [N] * B, tau, in_batch, doc_keys)


def naive_ragged_info_nce(q, docs, counts, tau, in_batch, doc_keys=None):
    """Per query: its positive, its own negatives and (in-batch) every other real document; compact docs
    ``[B positives | the counts[0] negatives of query 0 | ...]``, no padding anywhere."""
    B = q.shape[0]
    starts = [B + sum(counts[:i]) for i in range(B)]
    total = 0.0
    for i in range(B):
        own = {i} | {starts[i] + j for j in range(counts[i])}
        cands = []
        for m in range(docs.shape[0]):
            if m != i and doc_keys is not None and doc_keys[m] == doc_keys[i]:
                continue  # a copy of the positive is a false negative
            if m in own or in_batch[i]:
                cands.append(m)
        scores = torch.stack([q[i] @ docs[m] / tau for m in cands])
        total += -(scores[cands.index(i)] - torch.logsumexp(scores, 0))
    return total / B


@pytest.mark.parametrize("in_batch", [[True] * 4, [False] * 4, [True, False, True, False]])
def test_info_nce_matches_naive_loop_with_hard_negatives(in_batch):
    torch.manual_seed(0)
    B, N, D = 4, 3, 8
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    layout = contrastive_layout(B, N)
    got = info_nce(q, docs, layout, temperature=0.05, in_batch_negatives=torch.tensor(in_batch))
    assert got.item() == pytest.approx(naive_info_nce(q, docs, B, N, 0.05, in_batch).item(), rel=1e-5)


def test_duplicate_texts_are_masked_as_false_negatives():
    torch.manual_seed(1)
    B, N, D = 3, 1, 6
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    keys = torch.tensor([10, 11, 12, 10, 20, 21])  # doc 3 (query 0's negative) repeats query 0's positive text
    got = info_nce(q, docs, contrastive_layout(B, N), temperature=0.1, doc_keys=keys)
    expected = naive_info_nce(q, docs, B, N, 0.1, [True] * B, doc_keys=keys.tolist())
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = info_nce(q, docs, contrastive_layout(B, N), temperature=0.1)
    assert unmasked.item() != pytest.approx(got.item())


def test_symmetric_term_is_the_mean_of_both_directions():
    torch.manual_seed(2)
    B, D = 5, 4
    q = F.normalize(torch.randn(B, D), dim=-1)
    d = F.normalize(torch.randn(B, D), dim=-1)
    layout = contrastive_layout(B, 0)
    forward = F.cross_entropy(q @ d.T / 0.05, torch.arange(B))
    backward = F.cross_entropy(d @ q.T / 0.05, torch.arange(B))
    got = info_nce(q, d, layout, temperature=0.05, all_queries=q, symmetric=True)
    assert got.item() == pytest.approx(((forward + backward) / 2).item(), rel=1e-6)


def naive_symmetric_term(q, docs, B, tau, in_batch, query_keys):
    """Document -> query: each positive picks its query among all queries (or only it, without in-batch negatives)."""
    total = 0.0
    for i in range(B):
        cands = [j for j in range(B) if j == i or (in_batch[i] and query_keys[j] != query_keys[i])]
        scores = torch.stack([docs[i] @ q[j] / tau for j in cands])
        total += -(scores[cands.index(i)] - torch.logsumexp(scores, 0))
    return total / B


@pytest.mark.parametrize("in_batch", [[True] * 4, [False] * 4, [True, False, True, False]])
def test_symmetric_term_honours_in_batch_negatives(in_batch):
    torch.manual_seed(4)
    B, N, D = 4, 2, 8
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    keys = torch.tensor([1, 2, 1, 3])  # queries 0 and 2 share a text: never each other's negative
    flags = torch.tensor(in_batch)
    layout = contrastive_layout(B, N)
    got = info_nce(
        q, docs, layout, temperature=0.05, in_batch_negatives=flags, query_keys=keys, all_queries=q, symmetric=True
    )
    forward = naive_info_nce(q, docs, B, N, 0.05, in_batch)
    backward = naive_symmetric_term(q, docs, B, 0.05, in_batch, keys.tolist())
    assert got.item() == pytest.approx(((forward + backward) / 2).item(), rel=1e-5)


def test_layout_of_rank_blocks():
    lay = contrastive_layout(batch_size=2, num_negatives=2, rank=1, world=2)
    # rank 1's block starts at 1 * 2 * (1 + 2) = 6: positives 6, 7; negatives 8, 9 | 10, 11
    assert lay.positive.tolist() == [6, 7]
    assert lay.own.tolist() == [[6, 8, 9], [7, 10, 11]]


def test_matryoshka_is_weighted_sum_over_truncations():
    torch.manual_seed(3)
    q, d = torch.randn(4, 16), torch.randn(4, 16)
    layout = contrastive_layout(4, 0)

    def loss(a, b):
        return info_nce(a, b, layout, temperature=0.1)

    got = matryoshka(loss, (q, d), dims=[16, 8, 4], weights=[1.0, 0.5, 0.25])
    expected = sum(
        w * loss(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1))
        for k, w in [(16, 1.0), (8, 0.5), (4, 0.25)]
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 weights"):
        matryoshka(loss, (q, d), dims=[16, 8, 4], weights=[1.0, 0.5])


def test_perfect_embeddings_give_small_loss():
    e = torch.eye(4)
    loss = info_nce(e, e, contrastive_layout(4, 0), temperature=0.02)
    assert loss.item() < 1e-6 and math.isfinite(loss.item())


# ---------------------------------------------------------------------------- queries with different N
@pytest.mark.parametrize("in_batch", [[True] * 4, [False] * 4, [True, False, False, True]])
def test_queries_with_different_numbers_of_negatives_match_the_naive_loop(in_batch):
    from embforge.losses import document_slots, pad_documents

    torch.manual_seed(5)
    counts, D = [3, 1, 0, 2], 8  # e.g. retrieval with 3, binary classification with 1
    B, N = len(counts), max(counts)
    q = F.normalize(torch.randn(B, D), dim=-1).requires_grad_()
    docs = F.normalize(torch.randn(B + sum(counts), D), dim=-1).requires_grad_()  # only real documents
    keys = torch.arange(docs.shape[0])
    keys[B + 3] = keys[1]  # query 1's negative repeats its positive's text: a false negative, masked
    n = torch.tensor(counts)
    slots = document_slots(n, N)
    assert slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 13, 14]  # positives | q0: 4 5 6 | q1: 7 (8 9 pads) | q3: 13 14
    layout = contrastive_layout(B, N, negative_counts=n)
    padded = pad_documents(docs, slots, B * (1 + N))  # (B·(1+N), D), zero rows at the pads
    got = info_nce(
        q,
        padded,
        layout,
        temperature=0.05,
        in_batch_negatives=torch.tensor(in_batch),
        doc_keys=pad_documents(keys, slots, B * (1 + N), fill=-1),
    )
    expected = naive_ragged_info_nce(q, docs, counts, 0.05, in_batch, keys.tolist())
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got_grads = torch.autograd.grad(got, (q, docs))
    for g, e in zip(got_grads, torch.autograd.grad(expected, (q, docs))):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_equal_counts_give_the_unpadded_layout_and_loss():
    from embforge.losses import document_slots, pad_documents

    torch.manual_seed(6)
    B, N, D = 3, 2, 8
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    counts = torch.full((2 * B,), N)  # two ranks, every query with N
    lay = contrastive_layout(B, N, rank=1, world=2, negative_counts=counts)
    plain = contrastive_layout(B, N, rank=1, world=2)
    assert torch.equal(lay.own, plain.own) and bool(lay.valid.all())
    assert torch.equal(pad_documents(docs, document_slots(counts[:B], N), B * (1 + N)), docs)
    got = info_nce(q, docs, contrastive_layout(B, N, negative_counts=counts[:B]), temperature=0.05)
    assert got.item() == info_nce(q, docs, contrastive_layout(B, N), temperature=0.05).item()


def test_padding_slots_of_other_ranks_are_never_candidates():
    counts = torch.tensor([2, 0, 1, 2])  # rank 0: queries with 2 and 0; rank 1: 1 and 2 (N = 2)
    lay = contrastive_layout(2, 2, rank=0, world=2, negative_counts=counts)
    # rank blocks of 2·(1+2) = 6: [p0 p1 | n00 n01 | pad pad] [p2 p3 | n20 pad | n30 n31]
    assert lay.valid.tolist() == [1, 1, 1, 1, 0, 0] + [1, 1, 1, 0, 1, 1]


# ---------------------------------------------------------------------------- loss options
def naive_row(s_target, negatives, tau, margin, beta):
    """-log of the target's share; ``negatives`` scalar scores, filtered by the margin, weighted by hardness."""
    if margin is not None:
        negatives = [s for s in negatives if s.item() <= s_target.item() + margin]
    n = len(negatives)
    weights = [1.0] * n
    if beta and n:
        z = sum(math.exp(beta * s.item()) for s in negatives)
        weights = [n * math.exp(beta * s.item()) / z for s in negatives]
    denominator = torch.exp(s_target / tau) + sum(w * torch.exp(s / tau) for w, s in zip(weights, negatives))
    return -(s_target / tau - torch.log(denominator))


def naive_options(q, docs, N, tau, in_batch, doc_keys, query_keys, symmetric, same_tower, margin, beta):
    """Every option spelled out per query: which candidates enter each row's denominator, and how."""
    B, M = q.shape[0], docs.shape[0]
    own = [{i} | {B + i * N + j for j in range(N)} for i in range(B)]
    forward = 0.0
    for i in range(B):
        negatives = [
            q[i] @ docs[m] for m in range(M) if m != i and (m in own[i] or in_batch[i]) and doc_keys[m] != doc_keys[i]
        ]
        if same_tower and in_batch[i]:
            negatives += [q[i] @ q[j] for j in range(B) if j != i and query_keys[j] != query_keys[i]]
        forward += naive_row(q[i] @ docs[i], negatives, tau, margin, beta)
    forward = forward / B
    if not symmetric:
        return forward
    backward = 0.0
    for i in range(B):
        negatives = []
        if in_batch[i]:
            negatives = [docs[i] @ q[j] for j in range(B) if j != i and query_keys[j] != query_keys[i]]
            if same_tower:
                negatives += [docs[i] @ docs[m] for m in range(M) if m != i and doc_keys[m] != doc_keys[i]]
        backward += naive_row(docs[i] @ q[i], negatives, tau, margin, beta)
    return (forward + backward / B) / 2


OPTIONS = [  # (symmetric, same_tower, false_negative_margin, hardness)
    (False, False, None, 0.0),
    (False, True, None, 0.0),  # same-tower: other queries in the denominator
    (True, False, None, 0.0),  # both directions
    (True, True, None, 0.0),
    (False, False, 0.05, 0.0),  # false-negative masking above the positive + margin
    (True, True, 0.0, 0.0),
    (False, False, None, 4.0),  # hardness weighting
    (True, True, 0.1, 2.0),  # all at once
]


@pytest.mark.parametrize("in_batch", [[True] * 5, [False] * 5, [True, False, True, True, False]])
@pytest.mark.parametrize("symmetric,same_tower,margin,beta", OPTIONS)
def test_loss_options_match_the_naive_loop(in_batch, symmetric, same_tower, margin, beta):
    torch.manual_seed(7)
    B, N, D = 5, 2, 6  # few dimensions: some negatives score above their positive, so the margin masks some
    q = F.normalize(torch.randn(B, D), dim=-1).requires_grad_()
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1).requires_grad_()
    doc_keys = torch.arange(100, 100 + B * (1 + N))
    doc_keys[B + 1] = doc_keys[0]  # query 0's second negative repeats its positive: masked
    query_keys = torch.tensor([1, 2, 1, 3, 4])  # queries 0 and 2 share a text: never each other's negative
    got = info_nce(
        q,
        docs,
        contrastive_layout(B, N),
        temperature=0.1,
        in_batch_negatives=torch.tensor(in_batch),
        doc_keys=doc_keys,
        query_keys=query_keys,
        all_queries=q,
        symmetric=symmetric,
        same_tower=same_tower,
        false_negative_margin=margin,
        hardness=beta,
    )
    expected = naive_options(
        q, docs, N, 0.1, in_batch, doc_keys.tolist(), query_keys.tolist(), symmetric, same_tower, margin, beta
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, e in zip(torch.autograd.grad(got, (q, docs)), torch.autograd.grad(expected, (q, docs))):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_each_option_changes_the_loss():
    """The grid above would pass for an option that is ignored by both sides; here each one must matter."""
    torch.manual_seed(7)
    B, N, D = 5, 2, 6
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    layout = contrastive_layout(B, N)
    plain = info_nce(q, docs, layout, temperature=0.1, all_queries=q).item()
    for option in [dict(symmetric=True), dict(same_tower=True), dict(false_negative_margin=0.05), dict(hardness=4.0)]:
        assert info_nce(q, docs, layout, temperature=0.1, all_queries=q, **option).item() != pytest.approx(plain), (
            option
        )
    with pytest.raises(ValueError, match="need all_queries"):
        info_nce(q, docs, layout, same_tower=True)


def test_spread_out_matches_its_definition():
    torch.manual_seed(8)
    B, N, D = 4, 1, 8
    q = F.normalize(torch.randn(B, D), dim=-1)
    docs = F.normalize(torch.randn(B * (1 + N), D), dim=-1)
    layout = contrastive_layout(B, N)
    pairs = document_candidates(B, docs.shape[0], layout, torch.tensor([True, True, False, True]), None, q.device)
    pairs[torch.arange(B), layout.positive] = False
    sims = [
        (q[i] @ docs[m]).item()
        for i in range(B)
        for m in range(docs.shape[0])
        if m != i and (i != 2 or m == B + i)  # query 2 has no in-batch negatives: only its own negative
    ]
    m1 = sum(sims) / len(sims)
    m2 = sum(s * s for s in sims) / len(sims)
    assert int(pairs.sum()) == len(sims)
    assert spread_out(q, docs, pairs).item() == pytest.approx(m1**2 + max(0.0, m2 - 1 / D), rel=1e-5)
    # points spread like a uniform sphere's score about 0; one direction for all scores high
    same = F.normalize(torch.ones(B * (1 + N), D), dim=-1)
    assert spread_out(same[:B], same, pairs).item() > 0.9


def test_the_recipe_switches_reach_the_loss():
    """LossConfig's options, through the training step's loss function, equal the naive loop (+ GOR by hand)."""
    from tests.unit.train.helpers import make_batch, records, tiny_embedder

    from embforge.train import contrastive
    from embforge.train.parallel import DistInfo
    from embforge.train.recipe import LossConfig

    model = tiny_embedder()
    batch = make_batch(model, records(4, 2, seed=3), 2)
    with torch.no_grad():
        q = F.normalize(model(**batch.queries), dim=-1)
        d = F.normalize(model(**batch.docs), dim=-1)
    cfg = LossConfig(
        temperature=0.05,
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.05,
        hardness_weighting=3.0,
        spread_out_weight=0.7,
    )
    got = contrastive.make_loss_fn(batch, cfg, DistInfo())(q, d).item()
    flags, doc_keys, query_keys = [True] * 4, batch.doc_keys.tolist(), batch.query_keys.tolist()
    nce = naive_options(q, d, 2, 0.05, flags, doc_keys, query_keys, True, True, 0.05, 3.0).item()
    sims = [(q[i] @ d[m]).item() for i in range(4) for m in range(d.shape[0]) if m != i and doc_keys[m] != doc_keys[i]]
    gor = (sum(sims) / len(sims)) ** 2 + max(0.0, sum(s * s for s in sims) / len(sims) - 1 / q.shape[1])
    assert got == pytest.approx(nce + 0.7 * gor, rel=1e-5)
