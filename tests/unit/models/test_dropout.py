"""CPU dropout (cheaper mask, PyTorch's distribution) and the attention that uses it in training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embforge.models.tiny import tiny_bert
from embforge.train import dropout as fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    mask = fast_dropout.keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    std = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * std
    # rows and columns are not correlated: each row's keep rate is near 1 - p too
    per_row = mask.float().mean(1)
    assert (per_row - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / 1000) ** 0.5


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(3)
    a = fast_dropout.keep_mask((7, 9), 0.1)
    torch.manual_seed(3)
    b = fast_dropout.keep_mask((7, 9), 0.1)
    c = fast_dropout.keep_mask((7, 9), 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_dropout_scales_survivors_and_routes_gradients_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 50, requires_grad=True)
    out = fast_dropout.dropout(x, 0.2, True)
    kept = out != 0
    assert 0.7 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g * kept / 0.8)
    assert fast_dropout.dropout(x, 0.2, False) is x and fast_dropout.dropout(x, 0.0, True) is x


def test_use_fast_dropout_swaps_every_dropout_module_and_keeps_its_mode_and_p():
    backbone, _ = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    plain = sum(type(m) is nn.Dropout for m in backbone.modules())
    assert plain > 0
    backbone.train()
    assert fast_dropout.use_fast_dropout(backbone) == plain
    fast = [m for m in backbone.modules() if isinstance(m, nn.Dropout)]
    assert len(fast) == plain and all(type(m) is fast_dropout.Dropout and m.p == 0.1 and m.training for m in fast)
    assert fast_dropout.use_fast_dropout(backbone) == 0  # idempotent


def _attention_inputs(seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(3, 2, 6, 4) for _ in range(3))
    key_mask = (torch.arange(6)[None] < torch.tensor([6, 4, 1])[:, None])[:, None, None, :]  # (3, 1, 1, 6)
    return q, k, v, key_mask


def test_dropout_attention_without_dropout_is_sdpa():
    q, k, v, key_mask = _attention_inputs()
    torch.testing.assert_close(
        fast_dropout.dropout_attention(q, k, v, key_mask, 0.0),
        F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask),
    )
    torch.testing.assert_close(
        fast_dropout.dropout_attention(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v)
    )


def test_dropout_attention_drops_probabilities_with_the_seeded_mask():
    q, k, v, key_mask = _attention_inputs()
    torch.manual_seed(5)
    out = fast_dropout.dropout_attention(q, k, v, key_mask, 0.25, scale=0.3)
    torch.manual_seed(5)
    keep = fast_dropout.keep_mask((3, 2, 6, 6), 0.25)  # the same draws, by hand
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~key_mask, float("-inf"))
    expected = (scores.softmax(-1) * keep / 0.75) @ v
    torch.testing.assert_close(out, expected)
