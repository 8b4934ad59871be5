"""`embforge plan`: the memory arithmetic against a hand computation for a tiny model."""

import pytest

from embforge.config import from_dict
from embforge.modeling.head import HeadSpec
from embforge.models.build import apply_lora
from embforge.models.embedder import Embedder
from embforge.models.spec import LoraConfig
from embforge.models.tiny import tiny_decoder
from embforge.train.plan import plan_stage
from embforge.train.recipe import StageConfig


@pytest.mark.parametrize("parallel,gpus", [("ddp", 2), ("fsdp", 2)])
def test_plan_matches_a_hand_computation(parallel, gpus):
    backbone, tokenizer = tiny_decoder("llama")  # hidden 64, 2 layers, 4 heads x 16, 2 KV heads, MLP 128
    model = Embedder(
        backbone,
        tokenizer,
        HeadSpec(max_seq_len=32, pooling={"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16}),
    )
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    stage = from_dict(
        StageConfig,
        {
            "name": "s",
            "steps": 1,
            "data": {"batch_size": 4, "num_negatives": 1, "datasets": [{"name": "d", "path": "x"}]},
        },
    )
    plan = plan_stage(
        model, stage, gpus=gpus, parallel=parallel, dtype="float32", lora_rank=4, lora_targets=["q_proj", "v_proj"]
    )

    # by hand. Parameters: LoRA A (r x in) + B (out x r) on q (64->64) and v (64->32) in 2 layers; the head
    lora = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    head = (
        8 * 64  # latents
        + 3 * 2 * 64  # LayerNorms on the states, the latents and before the feed-forward (weight + bias)
        + 64 * 32
        + 64 * 64
        + 32 * 64  # to_q, to_kv, to_out (2 heads x 16, no bias)
        + (64 * 512 + 512)
        + (256 * 64 + 64)  # GEGLU feed-forward, 4x width, with biases
    )
    vocab = len(tokenizer)
    base = (
        vocab * 64  # embeddings
        + 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64)  # q k v o, gate up down, 2 norms
        + 64  # final norm
    )
    shard = gpus if parallel == "fsdp" else 1
    assert plan.trainable_weights == (lora + head) * 4 // shard
    assert plan.frozen_weights == base * 4 // shard
    assert plan.gradients == plan.trainable_weights and plan.optimizer == 2 * plan.trainable_weights
    # bf16: the frozen base halves; what trains keeps float32 masters, gradients and AdamW state
    bf16 = plan_stage(
        model, stage, gpus=gpus, parallel=parallel, dtype="bfloat16", lora_rank=4, lora_targets=["q_proj", "v_proj"]
    )
    assert bf16.frozen_weights == base * 2 // shard
    assert (bf16.trainable_weights, bf16.gradients, bf16.optimizer) == (
        plan.trainable_weights,
        plan.gradients,
        plan.optimizer,
    )
    # activations: 4 queries x (query + positive + 1 negative) x 32 tokens
    tokens = 4 * 3 * 32
    layer = (2 * 64 + 2 * 64 + (64 + 2 * 32) + 64 + 3 * 128) * 4  # norms in/out, q k v, attn out, gate up product
    layer += 2 * (64 * 4 + 64 + 4 * 4)  # LoRA on q and v: dropped input (fp32), mask (1 byte), rank-4 output
    head_acts = (64 + 64 + 32 + 32 + 64 + 64 + 2 * 256 + 256) * 4
    assert plan.tokens_per_pass == tokens
    assert plan.activations == tokens * (2 * layer + head_acts)
    assert plan.activations_checkpointed == tokens * (2 * 64 * 4 + layer + head_acts)


def test_plan_against_what_one_training_step_holds():
    """The plan's numbers against a measured step on CPU: the bytes of the trainable weights, their
    gradients and AdamW's state after a step, and the activations saved for backward (the distinct
    storages autograd keeps, weights excluded) per token."""
    import torch

    from embforge.data.pairs import Example
    from embforge.data.records import TrainingRecord
    from embforge.train.batches import collate
    from embforge.train.contrastive import contrastive_step
    from embforge.train.parallel import DistInfo

    torch.manual_seed(0)
    backbone, tokenizer = tiny_decoder("llama")
    model = Embedder(
        backbone,
        tokenizer,
        HeadSpec(max_seq_len=32, pooling={"name": "latent", "num_latents": 8, "num_heads": 2, "head_dim": 16}),
    )
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    data = {"batch_size": 4, "num_negatives": 1, "datasets": [{"name": "d", "path": "x"}]}
    stage = from_dict(StageConfig, {"name": "s", "steps": 1, "data": data})
    plan = plan_stage(
        model, stage, gpus=1, parallel="ddp", dtype="float32", lora_rank=4, lora_targets=["q_proj", "v_proj"]
    )
    long = " ".join(["alpha beta gamma delta epsilon"] * 20)  # every text fills the 32-token window
    examples = [
        Example(0, TrainingRecord(f"{i} {long}", [f"p{i} {long}"], [f"n{i} {long}"]), f"p{i} {long}", [f"n{i} {long}"])
        for i in range(4)
    ]
    model.train()
    batch = collate(examples, stage.data, lambda t, p: model.tokenize(t, prompt=p), torch.device("cpu"))
    tokens = batch.queries["input_ids"].numel() + batch.docs["input_ids"].numel()
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        contrastive_step(model, batch, stage.loss, DistInfo())
    optimizer.step()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)

    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert plan.trainable_weights == nbytes(trainable)
    assert plan.gradients == nbytes(p.grad for p in trainable)
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert plan.optimizer == nbytes(moments)  # (AdamW's per-tensor step counters aside)
    # the activation estimate leaves out small things (masks, the loss's logits): within 30 % per token
    per_token = activations / tokens
    planned = plan.activations / plan.tokens_per_pass
    assert 0.85 * planned <= per_token <= 1.3 * planned, (per_token, planned)


def test_the_full_size_recipes_plan_on_meta():
    """`embforge plan` for the two full-size recipes: NV-Embed stage 1 on Mistral-7B with LoRA and the
    latent head (FSDP), and Nomic Embed's contrastive stage on nomic-bert-2048 at batch 16,384 (8 x 2,048,
    GradCache chunks of 64); nothing is allocated, and a preset refuses to train."""
    from embforge.errors import ConfigError
    from embforge.models.build import build_embedder
    from embforge.train.plan import plan_recipe
    from embforge.train.recipe import load_recipe, recipe_path

    nomic, _ = load_recipe(recipe_path("nomic_embed/contrastive.yaml"), ["model.name_or_path=nomic-bert-2048"])
    embedder, (stage,) = plan_recipe(nomic, gpus=8)
    assert sum(p.numel() for p in embedder.parameters()) == 136_731_648  # arXiv 2402.01613 Table 6
    assert stage.tokens_per_pass == 64 * 2048  # one GradCache chunk of 2,048-token texts
    assert stage.optimizer == 2 * stage.gradients == 2 * 4 * 136_731_648  # DDP: nothing sharded
    assert stage.activations_checkpointed < stage.activations

    nv, _ = load_recipe(recipe_path("nv_embed/stage1.yaml"), [])
    embedder, (stage,) = plan_recipe(nv, gpus=8)
    trainable = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    assert stage.gradients == 4 * trainable // 8  # FSDP: float32 gradients of LoRA + head, sharded 8 ways
    with pytest.raises(ConfigError, match="has no weights and no tokenizer"):
        build_embedder(nomic.model, device="cpu")
