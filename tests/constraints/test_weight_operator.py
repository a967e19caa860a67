"""The operators of tether.constraints._weight_operator: a weight as a matrix, and the fit of
the power-iteration vectors that every operator shares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tether.constraints._conv_operator import conv_operator
from tether.constraints._weight_operator import MatrixOperator, WeightOperator
from tether.functional import power_iteration, singular_value_estimate

pytestmark = pytest.mark.usefixtures("one_thread")

# Weight shapes and the dim moved first.
RESHAPES = [((4, 3), 0), ((4, 3), 1), ((4, 3, 2), 1), ((2, 3, 2, 2), 3), ((2, 3, 2), -1)]


def tolerance(n: int) -> float:
    return 100 * n * torch.finfo(torch.float64).eps


def operator_and_weight(kind: str) -> tuple[WeightOperator, torch.Tensor]:
    """An operator of each kind with a float64 weight."""
    torch.manual_seed(0)
    if kind == "matrix":
        return MatrixOperator(torch.Size([4, 3, 2]), 1), torch.randn(4, 3, 2, dtype=torch.float64)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    operator = conv_operator("f()", "Conv2d.weight", layer.weight, layer, (2, 5, 4))
    return operator, layer.weight.detach()


def unit(shape, seed: int) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x / x.norm()


# MatrixOperator


@pytest.mark.parametrize(("shape", "dim"), RESHAPES, ids=str)
def test_the_matrix_has_dim_first_and_the_others_flattened(shape, dim):
    X = torch.randn(shape, dtype=torch.float64)
    operator = MatrixOperator(torch.Size(shape), dim)
    expected = X.movedim(dim, 0).reshape(shape[dim], -1)
    assert torch.equal(operator.matrix(X), expected)
    assert (operator.output_shape, operator.input_shape) == (
        (expected.shape[0],),
        expected.shape[1:],
    )


@pytest.mark.parametrize(("shape", "dim"), RESHAPES, ids=str)
def test_the_power_method_is_the_functional_one_on_the_matrix(shape, dim):
    X = torch.randn(shape, dtype=torch.float64)
    operator = MatrixOperator(torch.Size(shape), dim)
    W = operator.matrix(X)
    u, v = unit(operator.output_shape, 1), unit(operator.input_shape, 2)
    ours = operator.power_iteration(X, u, v, 3, 1e-12)
    for mine, reference in zip(ours, power_iteration(W, u, v, 3, 1e-12), strict=True):
        assert torch.equal(mine, reference)
    assert torch.equal(operator.estimate(X, u, v), singular_value_estimate(W, u, v))
    assert torch.allclose(operator.adjoint_vector(X, u), W.mT @ u)
    assert torch.equal(operator.norm(X), torch.linalg.matrix_norm(W, ord=2))


# The fit shared by every operator


@pytest.mark.parametrize("dense_limit", [0, 1 << 22], ids=["power_method", "svd"])
@pytest.mark.parametrize("kind", ["matrix", "conv"])
def test_top_singular_vectors_are_a_singular_pair_of_the_norm(kind, dense_limit, monkeypatch):
    monkeypatch.setattr("tether.constraints._weight_operator._DENSE_LIMIT", dense_limit)
    operator, X = operator_and_weight(kind)
    start = unit(operator.output_shape, 1), unit(operator.input_shape, 2)
    u, v = operator.top_singular_vectors(X, *start, 1e-12)
    sigma = operator.norm(X)
    A = operator.matrix(X)
    # The power method stops once the estimate stops growing: exact to rounding in sigma,
    # to about its square root in the vectors.
    atol = tolerance(A.shape[1]) if dense_limit else 100 * math.sqrt(torch.finfo(A.dtype).eps)
    assert torch.allclose(A @ v.flatten(), sigma * u.flatten(), atol=atol)
    assert torch.allclose(A.mT @ u.flatten(), sigma * v.flatten(), atol=atol)
    assert operator.estimate(X, u, v).item() == pytest.approx(sigma.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["matrix", "conv"])
def test_top_singular_vectors_take_the_sign_of_the_vectors_they_replace(kind):
    operator, X = operator_and_weight(kind)
    start = unit(operator.output_shape, 1), unit(operator.input_shape, 2)
    u, v = operator.top_singular_vectors(X, *start, 1e-12)
    flipped_u, flipped_v = operator.top_singular_vectors(X, -u, -v, 1e-12)
    atol = tolerance(operator.dense_size)
    assert torch.allclose(flipped_u, -u, atol=atol) and torch.allclose(flipped_v, -v, atol=atol)
    same_u, same_v = operator.top_singular_vectors(X, u, v, 1e-12)
    assert torch.allclose(same_u, u, atol=atol) and torch.allclose(same_v, v, atol=atol)


def test_a_power_fit_from_vectors_that_are_not_finite_starts_afresh(monkeypatch):
    monkeypatch.setattr("tether.constraints._weight_operator._DENSE_LIMIT", 0)
    operator, X = operator_and_weight("matrix")
    nan = torch.full(operator.output_shape, float("nan"), dtype=torch.float64)
    u, v = operator.top_singular_vectors(X, nan, torch.zeros(operator.input_shape).double(), 1e-12)
    assert operator.estimate(X, u, v).item() == pytest.approx(operator.norm(X).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["matrix", "conv"])
def test_is_power_state_accepts_a_power_step_and_refuses_other_vectors(kind):
    operator, X = operator_and_weight(kind)
    u, v = operator.power_iteration(
        X, unit(operator.output_shape, 1), unit(operator.input_shape, 2), 1, 1e-12
    )
    assert operator.is_power_state(X, u, v, 1e-12)
    assert not operator.is_power_state(X, u, unit(operator.input_shape, 3), 1e-12)
