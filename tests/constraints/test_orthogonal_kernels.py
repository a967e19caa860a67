"""The orthogonal constraints on batches of small matrices (convolution kernels) and with
the base point inside the map: the same weights and gradients as the composition
``base @ map(original)``, on every device without reading a value."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import tether
from tether.functional import cayley, householder

pytestmark = pytest.mark.usefixtures("one_thread")

# Kernels of convolutions (many 2 x 2 and 3 x 3 matrices: the closed forms; fewer 3 x 3 and
# 5 x 5: the batch-last inverse), and matrices of the Schur recursion and of LAPACK.
SHAPES = [(8, 8, 2, 2), (32, 32, 3, 3), (4, 8, 3, 3), (32, 5, 5), (70, 70), (4, 4)]
# (a square Grassmannian weight is its base, whatever the original: nothing to compare)
REGISTER = {"orthogonal": tether.orthogonal, "special_orthogonal": tether.special_orthogonal}


def module_with(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(torch.empty(shape, dtype=dtype))
    nn.init.orthogonal_(module.weight)
    return module


def composition(X: torch.Tensor, base: torch.Tensor, orthogonal_map: str):
    """``base @ map(generator)``, each step by autograd, as PyTorch's orthogonal computes it."""
    if orthogonal_map == "householder":
        return base @ householder(X)
    L = X.tril()
    A = L - L.mT
    return base @ (cayley(A) if orthogonal_map == "cayley" else torch.linalg.matrix_exp(A))


def cases():
    for helper in REGISTER:
        maps = ["cayley", "matrix_exp"] + (["householder"] if helper == "orthogonal" else [])
        for orthogonal_map in maps:
            for shape in SHAPES:
                yield pytest.param(
                    helper, orthogonal_map, shape, id=f"{helper}-{orthogonal_map}-{shape}"
                )


@pytest.mark.parametrize(("helper", "orthogonal_map", "shape"), list(cases()))
def test_weight_and_gradient_are_the_compositions(helper, orthogonal_map, shape):
    module = REGISTER[helper](module_with(shape), orthogonal_map=orthogonal_map)
    chain = module.parametrizations.weight
    with torch.no_grad():
        chain.original.copy_(torch.randn(shape, dtype=torch.float64))
    cotangent = torch.randn(shape, dtype=torch.float64)
    (module.weight * cotangent).sum().backward()
    leaf = chain.original.detach().clone().requires_grad_()
    expected = composition(leaf, chain[0].base, orthogonal_map)
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(module.weight, expected)
    torch.testing.assert_close(chain.original.grad, leaf.grad)


@pytest.mark.parametrize("orthogonal_map", ["cayley", "householder"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_forward_and_backward_read_no_value(orthogonal_map, shape, mode):
    # Meta and fake tensors have no values: a .item(), a bool(tensor) or a data-dependent
    # branch (each a host synchronisation on a GPU) raises there.
    module = tether.orthogonal(module_with(shape, torch.float32), orthogonal_map=orthogonal_map)
    constraint = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original.detach()
    fake_mode = FakeTensorMode()
    convert = (lambda t: t.to("meta")) if mode == "meta" else fake_mode.from_tensor
    X = convert(original).requires_grad_()
    constraint.base = convert(constraint.base)
    with fake_mode if mode == "fake" else contextlib.nullcontext():
        W = constraint(X)
        (grad,) = torch.autograd.grad(W, X, torch.ones_like(W))
    assert W.shape == grad.shape == shape


@pytest.mark.parametrize(
    ("helper", "orthogonal_map"),
    [
        ("orthogonal", "cayley"),
        ("special_orthogonal", "cayley"),
        ("orthogonal", "householder"),
        ("orthogonal", "matrix_exp"),
        ("special_orthogonal", "matrix_exp"),
    ],
)
def test_a_kernel_follows_every_write_of_its_base(helper, orthogonal_map):
    # The 3 x 3 closed forms keep the base's entries between reads (Note [The entries of a
    # base point, kept]): every way a base is written must reach the weight.
    shape = (32, 32, 3, 3)
    module = REGISTER[helper](module_with(shape), orthogonal_map=orthogonal_map)
    chain = module.parametrizations.weight

    def assert_the_composition():
        expected = composition(chain.original.detach(), chain[0].base, orthogonal_map)
        torch.testing.assert_close(module.weight, expected)

    with torch.no_grad():
        chain.original.copy_(torch.randn(shape, dtype=torch.float64) / 3)
    before = module.weight.detach().clone()
    tether.update_base(module)
    assert_the_composition()
    torch.testing.assert_close(module.weight, before)
    other = REGISTER[helper](module_with(shape), orthogonal_map=orthogonal_map)
    module.load_state_dict(other.state_dict())
    assert_the_composition()
    torch.testing.assert_close(module.weight, other.weight)
    with torch.no_grad():
        chain[0].base.copy_(torch.linalg.qr(torch.randn(shape, dtype=torch.float64)).Q)
    assert_the_composition()
