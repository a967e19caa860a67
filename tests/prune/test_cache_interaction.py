"""Pruning again while a cache is open: inside ``tether.cached()`` and inside a call of a model
that ``tether.autocache`` wraps, the weight read after the second pruning is the one with the
new mask, never the cached value from before it (the mask changes in place, so the cache must
be told)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tether
from tether import prune

N = 6

# Each prunes ``module.weight`` again, to a mask with more zeros than the first pruning's.
PRUNE_AGAIN: dict[str, Callable[[nn.Module], object]] = {
    "l1_unstructured": lambda module: prune.l1_unstructured(module, "weight", amount=0.5),
    "random_unstructured": lambda module: prune.random_unstructured(module, "weight", amount=0.5),
    "ln_structured": lambda module: prune.ln_structured(module, "weight", amount=2, n=2, dim=0),
    "custom_from_mask": lambda module: prune.custom_from_mask(
        module, "weight", torch.eye(N, device=module.weight.device)
    ),
}


def pruned(device: torch.device) -> nn.Linear:
    """A Linear whose weight is pruned once (a quarter of its entries)."""
    return prune.l1_unstructured(nn.Linear(N, N, device=device), "weight", amount=0.25)


def zeros(W: torch.Tensor) -> int:
    return int((W == 0).sum())


@pytest.mark.parametrize("method", list(PRUNE_AGAIN))
def test_pruning_again_inside_cached_serves_the_new_mask(method, device):
    layer = pruned(device)
    with tether.cached():
        before = layer.weight
        PRUNE_AGAIN[method](layer)
        after = layer.weight
    expected = layer.weight  # outside the block: computed afresh
    assert zeros(expected) > zeros(before)
    assert torch.equal(after, expected)


class PrunesBetweenReads(nn.Module):
    """Applies its layer, prunes the layer's weight again, and applies it once more: one call
    reads the weight before and after the second pruning."""

    def __init__(self, layer: nn.Module, prune_again: Callable[[nn.Module], object]) -> None:
        super().__init__()
        self.layer = layer
        self.prune_again = prune_again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        self.prune_again(self.layer)
        return self.layer(torch.tanh(y))


@pytest.mark.parametrize("method", list(PRUNE_AGAIN))
def test_pruning_again_inside_an_autocached_call_serves_the_new_mask(method, device):
    model = PrunesBetweenReads(pruned(device), PRUNE_AGAIN[method])
    uncached = copy.deepcopy(model)
    tether.autocache(model)
    x = torch.randn(3, N, device=device)
    torch.manual_seed(1)  # random pruning draws the same mask in both calls
    got = model(x)
    torch.manual_seed(1)
    expected = uncached(x)
    assert torch.equal(model.layer.weight, uncached.layer.weight)  # the same masks
    # The same operations on the same values: equal to the last bit.
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
