"""The base point of the orthogonal constraints is updated in place, never rebound.

Replicas (``DataParallel``, DDP's broadcast buffers), compiled graphs and optimizers hold the
``base`` buffer by identity, so every write of a new base (an assignment through
``right_inverse``, ``load_state_dict`` in tether's layout or a plain one, ``update_base``) must
copy into the same tensor, in the same memory. Each test checks that the base did change, so
that it cannot pass because nothing was written.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import tether

# (registering function, in_features, out_features): square, tall, wide, and a thin weight
# (200 x 4, whose base is stored compact: Note [Trivialization with a base point]).
HELPERS: dict[str, tuple[Callable[[nn.Module], nn.Module], int, int]] = {
    "orthogonal": (tether.orthogonal, 4, 4),
    "orthogonal-tall": (tether.orthogonal, 3, 5),
    "orthogonal-wide": (tether.orthogonal, 5, 3),
    "orthogonal-thin": (tether.orthogonal, 4, 200),
    "orthogonal-cayley": (lambda m: tether.orthogonal(m, orthogonal_map="cayley"), 4, 4),
    "orthogonal-householder": (lambda m: tether.orthogonal(m, orthogonal_map="householder"), 4, 4),
    "special_orthogonal": (tether.special_orthogonal, 4, 4),
    "grassmannian": (tether.grassmannian, 2, 5),
}


def build(kind: str, seed: int, device: torch.device) -> nn.Linear:
    register, n_in, n_out = HELPERS[kind]
    torch.manual_seed(seed)
    return register(nn.Linear(n_in, n_out, device=device))  # type: ignore[return-value]


def moved(layer: nn.Linear) -> nn.Linear:
    """The original moved away from the base point, as training moves it."""
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.add_(0.3 * torch.randn_like(original))
    return layer


WRITES: dict[str, Callable[[nn.Linear, nn.Linear], object]] = {
    "assignment": lambda layer, other: setattr(layer, "weight", other.weight.detach()),
    "load_state_dict": lambda layer, other: layer.load_state_dict(other.state_dict()),
    "plain checkpoint": lambda layer, other: layer.load_state_dict(tether.plain_state_dict(other)),
    "update_base": lambda layer, other: tether.update_base(moved(layer)),
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("kind", list(HELPERS))
def test_a_new_base_is_copied_into_the_same_tensor(kind, write, device):
    layer, other = build(kind, 0, device), build(kind, 1, device)
    constraint = layer.parametrizations.weight[0]
    base = constraint.base
    address, before = base.data_ptr(), base.clone()
    WRITES[write](layer, other)
    assert constraint.base is base
    assert constraint.base.data_ptr() == address
    assert not torch.equal(base, before), "the write did not change the base"
