import torch

from embforge.modeling.pooling import Pooling


def test_poolings_use_the_mask_for_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # (B, T, D)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(Pooling("cls")(hidden, right), hidden[[0, 1], [0, 0]])
    assert torch.equal(Pooling("last")(hidden, right), hidden[[0, 1], [2, 1]])
    assert torch.equal(Pooling("last")(hidden, left), hidden[[0, 1], [3, 3]])
    assert torch.equal(Pooling("cls")(hidden, left), hidden[[0, 1], [1, 2]])
    mean = Pooling("mean")(hidden, right)
    assert torch.allclose(mean[1], hidden[1, :2].mean(0))


def test_mean_of_fully_masked_row_is_zero_not_nan():
    out = Pooling("mean")(torch.ones(1, 3, 2), torch.zeros(1, 3))
    assert torch.equal(out, torch.zeros(1, 2))
