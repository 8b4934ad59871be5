"""GradCache: contrastive batches far larger than memory, with the exact same gradients.

A contrastive loss couples every query with every document, so a batch cannot simply be
split into micro-batches. GradCache (Gao et al. 2021) does it in three passes:

1. embed all chunks without building graphs, recording each chunk's RNG state;
2. compute the loss on the cached embeddings (detached leaves) and backpropagate it to
   the embeddings only — this is where the batch-wide coupling lives;
3. re-embed each chunk with gradients, replaying its RNG state so dropout draws the same
   masks, and backpropagate the cached embedding gradients into the model.

Memory is that of one chunk's activations plus the (B, D) embeddings. The loss function
is any function of the embeddings, so Matryoshka and the cross-device gather compose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

Features = dict[str, torch.Tensor]


class RngState:
    """The CPU and CUDA RNG states at one moment, restorable inside a forked RNG."""

    def __init__(self, devices: Sequence[int]):
        self.devices = list(devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self):
        # fork: restoring the state must not disturb the RNG stream of the caller
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


def _cuda_devices(chunks: Sequence[Features]) -> list[int]:
    return sorted({t.device.index or 0 for c in chunks for t in c.values() if t.is_cuda})


def split_features(features: Features, chunk_size: int) -> list[Features]:
    """Split a tokenised batch (every tensor (N, …)) into chunks of ``chunk_size`` rows."""
    n = next(iter(features.values())).shape[0]
    return [{k: v[i : i + chunk_size] for k, v in features.items()} for i in range(0, n, chunk_size)]


def grad_cache_step(
    embed: Callable[[Features], torch.Tensor],
    inputs: Sequence[Sequence[Features]],
    loss_fn: Callable[..., torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Run forward and backward of ``loss_fn(*embeddings)`` chunk by chunk.

    Args:
        embed: features -> (n, D) embeddings with gradients (the model's forward).
        inputs: one list of chunks per loss argument, e.g. ``[query_chunks, doc_chunks]``.
        loss_fn: ``(queries (B, D), docs (M, D), …) -> scalar``.
        no_sync: context manager that suspends DDP's gradient all-reduce (``model.no_sync``);
            used for every re-forward but the last, so gradients are reduced once.

    Returns:
        The loss (detached). Parameter gradients are accumulated into ``.grad``.
    """
    devices = _cuda_devices([c for group in inputs for c in group])
    states: list[list[RngState]] = []
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for group in inputs:
            group_states, embs = [], []
            for chunk in group:
                group_states.append(RngState(devices))
                embs.append(embed(chunk))
            states.append(group_states)
            cached.append(torch.cat(embs).detach().requires_grad_())

    loss = loss_fn(*cached)
    loss.backward()  # gradients w.r.t. the cached embeddings only

    jobs = [(g, c) for g, group in enumerate(inputs) for c in range(len(group))]
    for n, (g, c) in enumerate(jobs):
        start = sum(inputs[g][i][next(iter(inputs[g][i]))].shape[0] for i in range(c))
        with states[g][c].replay(), no_sync() if n < len(jobs) - 1 else contextlib.nullcontext():
            emb = embed(inputs[g][c])
            grad = cached[g].grad[start : start + emb.shape[0]]
            # d(loss)/d(params) = Σ grad · d(emb)/d(params): a surrogate whose gradient is exactly that
            torch.dot(emb.flatten(), grad.flatten()).backward()
    return loss.detach()
