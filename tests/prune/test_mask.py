"""Tests for ``PruningMask``, the parametrization, and the helpers that find it in a chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Double
from tether.prune import PruningMask
from tether.prune._mask import find_mask, value_through
from tether.testing import check_parametrization


def random_mask(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(shape) > 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2, 2)])
def test_forward_zeroes_the_pruned_entries_and_keeps_shape_and_dtype(shape, dtype):
    mask = random_mask(shape, dtype)
    X = torch.randn(shape, dtype=dtype)
    Y = PruningMask(mask)(X)
    assert Y.shape == X.shape
    assert Y.dtype == dtype
    assert torch.equal(Y, torch.where(mask == 1, X, X * 0))


def test_forward_casts_a_mask_of_another_dtype():
    mask = torch.tensor([True, False, True])
    X = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    Y = PruningMask(mask)(X)
    assert Y.dtype == torch.float64
    assert torch.equal(Y, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))


def test_gradient_of_a_pruned_entry_is_zero():
    mask = random_mask((4, 5))
    X = torch.randn(4, 5, requires_grad=True)
    cotangent = torch.randn(4, 5)
    (PruningMask(mask)(X) * cotangent).sum().backward()
    assert torch.equal(X.grad, cotangent * mask)


def test_gradcheck_in_float64():
    mask = random_mask((3, 4), torch.float64)
    X = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PruningMask(mask), (X,))


def test_right_inverse_keeps_the_unpruned_values():
    X = torch.randn(3, 4)
    pruning = PruningMask(random_mask((3, 4)))
    assert pruning.right_inverse(X) is X
    assert torch.equal(pruning(pruning.right_inverse(X)), pruning(X))


def test_check_parametrization_passes_on_a_pruned_tensor():
    pruning = PruningMask(random_mask((4, 4)))
    check_parametrization(pruning, pruning(torch.randn(4, 4)))


def test_the_mask_is_a_buffer_in_the_state_dict():
    layer = tether.register_parametrization(
        nn.Linear(3, 2), "weight", PruningMask(random_mask((2, 3)))
    )
    assert list(layer.state_dict()) == [
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.mask",
    ]
    assert not layer.parametrizations.weight[0].mask.requires_grad


def test_assigning_a_weight_stores_it_and_reads_it_masked():
    mask = random_mask((2, 3))
    layer = tether.register_parametrization(nn.Linear(3, 2), "weight", PruningMask(mask))
    value = torch.randn(2, 3)
    layer.weight = value
    assert torch.equal(layer.parametrizations.weight.original, value)
    assert torch.equal(layer.weight, value * mask)


def test_repr_counts_the_pruned_entries():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert repr(PruningMask(mask)) == "PruningMask(pruned=2/6)"
    assert repr(PruningMask(torch.ones(2, device="meta"))) == "PruningMask(shape=(2,))"


def test_a_mask_that_is_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match="tensor of zeros and ones"):
        PruningMask([1, 0])


def test_find_mask_finds_the_last_mask_in_the_chain():
    layer = nn.Linear(3, 3)
    assert find_mask(layer, "weight") is None
    tether.register_parametrization(layer, "weight", Double())
    assert find_mask(layer, "weight") is None
    first, second = PruningMask(torch.ones(3, 3)), PruningMask(torch.ones(3, 3))
    tether.register_parametrization(layer, "weight", first)
    tether.register_parametrization(layer, "weight", second)
    plist, index, pruning = find_mask(layer, "weight")
    assert (index, pruning) == (2, second)
    assert plist is layer.parametrizations.weight


def test_value_through_stops_at_the_given_parametrization():
    layer = nn.Linear(3, 3)
    mask = random_mask((3, 3))
    original = layer.weight.detach().clone()
    tether.register_parametrization(layer, "weight", PruningMask(mask))
    tether.register_parametrization(layer, "weight", Double())
    plist = layer.parametrizations.weight
    with torch.no_grad():
        assert torch.equal(value_through(plist, 0), original * mask)
        assert torch.equal(value_through(plist, 1), layer.weight)
