"""The transformers behaviours that bidirectional decoders rest on (embforge/modeling/attention.py).

If an upgrade of transformers changes one of them, the test of that behaviour fails by name,
instead of NV-Embed-style models silently attending causally again.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embforge.models.tiny import DECODER_FAMILIES, tiny_decoder


def _states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_a_decoder_uses_a_4d_mask_as_is_without_adding_the_causal_mask(family, impl):
    model, _ = tiny_decoder(family, attn_implementation=impl)
    ids = torch.tensor([[5, 9, 12, 30, 41, 7]])
    later = ids.clone()
    later[0, -1] = 50  # only the last token differs
    T = ids.shape[1]
    if impl == "sdpa":
        full = torch.ones(1, 1, T, T, dtype=torch.bool)  # everyone sees everyone
    else:
        full = torch.zeros(1, 1, T, T)  # eager adds the mask to the scores
    first = [_states(model, x, full)[0, 0] for x in (ids, later)]
    assert not torch.allclose(*first, atol=1e-6), "the first token must see the last one through a 4-D mask"
    causal = [_states(model, x, torch.ones(1, T, dtype=torch.long))[0, 0] for x in (ids, later)]
    torch.testing.assert_close(*causal)  # a 2-D mask: transformers adds its causal mask (the first sees only itself)


def test_sdpa_attention_is_not_causal_when_a_mask_is_given():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        is_causal = True  # as decoder attention layers declare
        num_key_value_groups = 1
        training = False

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))  # (B, H, T, Dh)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    out, _ = sdpa_attention_forward(Attention(), q, k, v, mask, dropout=0.0, scaling=None)
    bidirectional = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, H, Dh)
    torch.testing.assert_close(out, bidirectional)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert not torch.allclose(out, causal)
