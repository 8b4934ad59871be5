"""Memory plan of a recipe on N GPUs, computed from its model built on the ``meta`` device.

``embforge plan RECIPE --gpus 8 --gpu-memory 80`` prints, per stage and per GPU: the weights
(frozen and trainable), gradients, AdamW state, and the activations kept for the backward
pass at the stage's batch and length, with and without gradient checkpointing.

The activation count is explicit arithmetic over what autograd saves, per token, for a
Llama/Mistral/Qwen decoder layer with fused (SDPA/flash) attention, optional LoRA (each
adapted projection keeps its dropped-out input and the rank-r intermediate), and the pooling
head. It is an estimate of the dominant terms, not an allocator trace: it leaves out the
allocator's fragmentation, the CUDA context (~0.5-1 GB) and temporary workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from embforge.modeling.pooling import AttentionPooling, num_parameters

_BYTES = {"float32": 4, "bfloat16": 2}
GB = 1024**3


@dataclass
class StagePlan:
    """Bytes per GPU for one stage."""

    stage: str
    tokens_per_pass: int  # tokens in flight in one forward pass (GradCache chunk or the whole batch)
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    activations: int  # no gradient checkpointing
    activations_checkpointed: int  # checkpoint at every decoder layer

    def total(self, checkpointed: bool) -> int:
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer + acts


def decoder_layer_bytes_per_token(config, lora_rank: int | None, lora_targets: list[str], act_bytes: int) -> int:
    """Bytes autograd keeps per token for one transformer layer (fused attention, SwiGLU MLP): a
    decoder's, or nomic-bert's (its two LayerNorms in place of the RMSNorms, the same tensors).

    Saved tensors, each of the activation dtype: the input of each of the two RMSNorms and
    their normalised outputs (inputs of q/k/v and of gate/up), q, k, v and the attention
    output (fused attention keeps no T x T matrix), the o_proj input, gate and up outputs and
    the SwiGLU product (down_proj input). With LoRA, every adapted projection also keeps its
    dropped-out input and its rank-r intermediate, plus a 1-byte dropout mask of the input.
    """
    D = config.hidden_size
    inner = config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or D // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim  # encoders: no grouped K/V
    q = heads * head_dim
    elements = (
        2 * D  # RMSNorm inputs (attention, MLP)
        + 2 * D  # RMSNorm outputs = inputs of q/k/v and of gate/up
        + q
        + 2 * kv  # q, k, v
        + q  # attention output = o_proj input
        + 3 * inner  # gate out, up out, SwiGLU product
    )
    total = elements * act_bytes
    if lora_rank:
        inputs = {"q_proj": D, "k_proj": D, "v_proj": D, "o_proj": q, "gate_proj": D, "up_proj": D, "down_proj": inner}
        for name in lora_targets:
            width = inputs.get(name)
            if width is not None:
                total += width * act_bytes + width + lora_rank * act_bytes  # dropped input, mask, A's output
    return total


def head_bytes_per_token(pooler, hidden: int, act_bytes: int) -> int:
    """Bytes the pooling head keeps per token (latent / self-attention heads; 0 for mean/cls/last)."""
    if not isinstance(pooler, AttentionPooling):
        return 0
    inner = pooler.num_heads * pooler.head_dim
    ff = pooler.mlp_ratio * hidden
    elements = (
        hidden  # LayerNorm input (token states)
        + hidden  # normalised states = to_q input
        + inner  # q
        + inner  # attention output = to_out input
        + hidden  # feed-forward LayerNorm input
        + hidden  # its output = first Linear's input
        + 2 * ff  # first Linear's output (GEGLU input)
        + ff  # GEGLU product = second Linear's input
    )
    return elements * act_bytes


def plan_stage(
    embedder, stage, *, gpus: int, parallel: str, dtype: str, lora_rank: int | None, lora_targets
) -> StagePlan:
    """Per-GPU memory of ``stage`` for ``embedder`` (built on meta), ``gpus`` ranks, DDP or FSDP.

    ``dtype`` is the frozen weights' (and the activations'); every trained tensor is a float32
    master with float32 gradients and AdamW state (``models.build.cast_frozen``).
    """
    w = _BYTES[dtype]
    master = _BYTES["float32"]
    config = embedder.backbone.config
    trainable = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    frozen = num_parameters(embedder) - trainable
    shard = gpus if parallel == "fsdp" else 1
    if stage.objective == "mlm":  # packed chunks: a rank's share of the batch, in micro-batches
        share = -(-stage.mlm.batch_size // gpus)
        tokens = min(stage.mlm.micro_batch_size or share, share) * stage.mlm.chunk_len
        hidden = config.hidden_size
        trainable += hidden * hidden + 2 * hidden  # the MLM head: dense + LayerNorm (its decoder is the embeddings)
        trainable -= sum(p.numel() for p in embedder.pooler.parameters() if p.requires_grad)  # the pooler idles
        # per token: the head's dense output, activation and norm; per masked token: the logits in the
        # activation dtype and the cross-entropy's float32 copy and gradient
        head = 3 * hidden * w + stage.mlm.mask_prob * config.vocab_size * (w + 2 * master)
    else:
        texts = stage.data.batch_size * (2 + stage.data.max_negatives)  # query + positive + negatives, per rank
        texts_per_pass = min(texts, stage.grad_cache_chunk) if stage.grad_cache_chunk else texts
        tokens = texts_per_pass * embedder.head.max_seq_len
        head = head_bytes_per_token(embedder.pooler, config.hidden_size, w)
    layer = decoder_layer_bytes_per_token(config, lora_rank, list(lora_targets or []), w)
    layers = config.num_hidden_layers
    residual = config.hidden_size * w  # a layer's input: all that checkpointing keeps per layer
    return StagePlan(
        stage=stage.name,
        tokens_per_pass=tokens,
        frozen_weights=frozen * w // shard,
        trainable_weights=trainable * master // shard,
        gradients=trainable * master // shard,
        optimizer=2 * trainable * master // shard,  # AdamW exp_avg + exp_avg_sq, float32 like the masters
        activations=int(tokens * (layers * layer + head)),
        activations_checkpointed=int(tokens * (layers * residual + layer + head)),
    )


def plan_recipe(recipe, *, gpus: int) -> tuple[object, list[StagePlan]]:
    """Build the recipe's model on meta and plan every stage."""
    from embforge.models.build import build_embedder

    embedder = build_embedder(recipe.model, device="meta")
    lora = recipe.model.lora
    plans = [
        plan_stage(
            embedder,
            stage,
            gpus=gpus,
            parallel=recipe.parallel,
            dtype=recipe.model.dtype,
            lora_rank=lora.r if lora else None,
            lora_targets=lora.target_modules if lora else [],
        )
        for stage in recipe.stages
    ]
    return embedder, plans


def format_plan(embedder, plans: list[StagePlan], *, gpus: int, gpu_memory_gb: float, parallel: str) -> str:
    """A plain-text table, GiB per GPU."""
    total = num_parameters(embedder)
    trainable = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    lines = [
        f"model: {total:,} parameters ({trainable:,} trainable), head {num_parameters(embedder.pooler):,}",
        f"{gpus} GPUs x {gpu_memory_gb:g} GiB, {parallel} ({'weights, gradients and optimizer sharded' if parallel == 'fsdp' else 'replicated'})",
        "",
        f"{'stage':<14}{'tokens/pass':>12}{'frozen':>9}{'trained':>9}{'grads':>8}{'AdamW':>8}"
        f"{'acts':>9}{'acts ckpt':>10}{'total':>9}{'total ckpt':>11}  fits",
    ]
    for p in plans:
        fits = []
        for ckpt in (False, True):
            fits.append("yes" if p.total(ckpt) / GB <= gpu_memory_gb else "no")
        lines.append(
            f"{p.stage:<14}{p.tokens_per_pass:>12,}{p.frozen_weights / GB:>9.2f}{p.trainable_weights / GB:>9.2f}"
            f"{p.gradients / GB:>8.2f}{p.optimizer / GB:>8.2f}{p.activations / GB:>9.2f}"
            f"{p.activations_checkpointed / GB:>10.2f}{p.total(False) / GB:>9.2f}{p.total(True) / GB:>11.2f}"
            f"  {fits[0]} / {fits[1]} (ckpt)"
        )
    lines.append("")
    lines.append("GiB per GPU; excludes the CUDA context, allocator fragmentation and kernel workspaces.")
    return "\n".join(lines)
