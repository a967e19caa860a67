"""Symmetric and Skew, and their helpers tether.symmetric and tether.skew."""

from __future__ import annotations

import geotorch
import pytest
import torch
from geotorch.skew import Skew as GeotorchSkew
from geotorch.symmetric import Symmetric as GeotorchSymmetric
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tether.constraints import Skew, Symmetric, default_atol
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
CONSTRAINTS = {"symmetric": (Symmetric, tether.symmetric, 1), "skew": (Skew, tether.skew, -1)}


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def is_member(X: torch.Tensor, sign: int) -> bool:
    return torch.equal(X, sign * X.mH)


@st.composite
def squares(draw):
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(*batch, n, n, dtype=dtype, generator=generator), generator


@pytest.mark.parametrize("kind", CONSTRAINTS)
@given(case=squares())
def test_forward_of_any_tensor_is_a_member(kind, case):
    X, _ = case
    cls, register, sign = CONSTRAINTS[kind]
    module = register(module_with(X))
    original = module.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.randn_like(original))
    W = module.weight
    assert W.shape == X.shape and W.dtype == X.dtype
    assert is_member(W, sign)
    assert cls().in_manifold(W)


@pytest.mark.parametrize("kind", CONSTRAINTS)
@given(case=squares())
def test_assigning_a_member_sets_it_exactly(kind, case):
    X, generator = case
    cls, register, _ = CONSTRAINTS[kind]
    member = cls().sample(X.shape, dtype=X.dtype, generator=generator)
    module = register(module_with(X))
    module.weight = member
    assert torch.equal(module.weight, member)


@pytest.mark.parametrize("kind", CONSTRAINTS)
@given(case=squares())
def test_sample_is_a_member_of_the_requested_shape_and_dtype(kind, case):
    X, generator = case
    cls, _, sign = CONSTRAINTS[kind]
    member = cls().sample(X.shape, dtype=X.dtype, generator=generator)
    assert member.shape == X.shape and member.dtype == X.dtype
    assert is_member(member, sign)
    assert cls().in_manifold(member)


@pytest.mark.parametrize("kind", CONSTRAINTS)
@given(case=squares())
def test_registration_keeps_a_member_and_projects_a_non_member(kind, case):
    X, _ = case
    _, register, sign = CONSTRAINTS[kind]
    projection = (X + sign * X.mH) / 2
    assert torch.equal(register(module_with(X)).weight, projection)
    assert torch.equal(register(module_with(projection)).weight, projection)


@pytest.mark.parametrize("kind", CONSTRAINTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_parametrization(kind, dtype):
    cls = CONSTRAINTS[kind][0]
    constraint = cls()
    check_parametrization(constraint, constraint.sample((2, 4, 4), dtype=dtype))


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_distance_is_the_frobenius_norm_of_the_other_part(kind):
    cls, _, sign = CONSTRAINTS[kind]
    X = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    other = (X - sign * X.mT) / 2
    torch.testing.assert_close(cls().distance(X), torch.linalg.matrix_norm(other))
    assert not cls().in_manifold(X)
    assert cls().distance(torch.zeros(0, 3, 3)) == 0


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_training_keeps_the_weight_a_member(kind):
    cls, register, sign = CONSTRAINTS[kind]
    layer = register(nn.Linear(6, 6))
    target = nn.Linear(6, 6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(64, 6)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert is_member(layer.weight, sign)
    assert cls().in_manifold(layer.weight)


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_a_batch_of_complex_matrices(kind):
    _, register, sign = CONSTRAINTS[kind]
    module = register(module_with(torch.randn(3, 4, 4, dtype=torch.complex64)))
    assert is_member(module.weight, sign)
    diagonal = module.weight.diagonal(dim1=-2, dim2=-1)
    # Hermitian: real diagonal; skew-Hermitian: imaginary diagonal.
    assert torch.equal(
        (diagonal.imag if sign == 1 else diagonal.real).abs().max(), torch.tensor(0.0)
    )


@pytest.mark.parametrize("kind", CONSTRAINTS)
@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 3, 4)], ids=str)
def test_bad_shapes_are_rejected_with_the_documented_error(kind, shape):
    cls, register, _ = CONSTRAINTS[kind]
    with pytest.raises(
        ValueError, match=rf"{kind}\(\) on Module.weight needs a square matrix"
    ) as info:
        register(module_with(torch.randn(shape)))
    assert str(tuple(shape)) in str(info.value)
    with pytest.raises(ValueError, match="square"):
        cls().sample(shape)
    with pytest.raises(ValueError, match="the assigned value"):
        cls().right_inverse(torch.randn(shape))
    assert not cls().in_manifold(torch.zeros(shape))


def test_symmetric_agrees_with_geotorch_on_membership():
    layer = geotorch.symmetric(nn.Linear(5, 5))
    assert Symmetric().in_manifold(layer.weight.detach())
    assert GeotorchSymmetric.in_manifold(Symmetric().sample((5, 5)))
    assert GeotorchSymmetric.in_manifold(tether.symmetric(nn.Linear(5, 5)).weight.detach())
    X = torch.randn(5, 5)
    assert not Symmetric().in_manifold(X)
    assert not GeotorchSymmetric.in_manifold(X)


def test_skew_agrees_with_geotorch_on_membership():
    layer = geotorch.skew(nn.Linear(5, 5))
    assert Skew().in_manifold(layer.weight.detach())
    assert Skew().in_manifold(GeotorchSkew((5, 5)).sample())
    assert GeotorchSkew.in_manifold(Skew().sample((5, 5)))
    assert GeotorchSkew.in_manifold(tether.skew(nn.Linear(5, 5)).weight.detach())


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_membership_tolerance_follows_the_dtype(kind):
    cls = CONSTRAINTS[kind][0]
    X = cls().sample((4, 4), dtype=torch.float64)
    nudge = torch.zeros(4, 4, dtype=torch.float64)
    nudge[0, 1] = 10 * default_atol(torch.float64)
    assert cls().in_manifold(X)
    assert not cls().in_manifold(X + nudge)
    assert cls().in_manifold(X + nudge, atol=1.0)
