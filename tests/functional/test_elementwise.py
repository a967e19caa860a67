"""The vector and elementwise maps: project_sphere, poincare_exp/log, softplus_inverse,
project_simplex."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.constraints import default_atol
from tether.functional import (
    poincare_exp,
    poincare_log,
    project_simplex,
    project_sphere,
    softplus_inverse,
)

DTYPES = [torch.float32, torch.float64]


def randn(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, dtype=dtype, generator=generator)


@st.composite
def shapes_and_dims(draw, min_dims=1):
    """A small shape and a ``dim`` for it: None, an int or a tuple."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=min_dims, max_size=3)))
    ndim = len(shape)
    options = [None, -1, 0, tuple(range(ndim)), tuple(range(1, ndim)) or -1]
    return shape, draw(st.sampled_from(options))


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)


def slice_norms(X, dim):
    return torch.linalg.vector_norm(X, dim=dim)


# project_sphere


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.5, 1.0, 3.0]))
def test_project_sphere_lands_on_the_sphere(shape_dim, dtype, seed, radius):
    shape, dim = shape_dim
    Y = project_sphere(randn(shape, dtype, seed), radius, dim)
    assert Y.shape == shape and Y.dtype == dtype
    norms = slice_norms(Y, dim)
    assert torch.allclose(norms, torch.full_like(norms, radius), atol=default_atol(dtype))


@given(shapes_and_dims(), dtypes, seeds)
def test_project_sphere_keeps_members(shape_dim, dtype, seed):
    shape, dim = shape_dim
    Y = project_sphere(randn(shape, dtype, seed), 2.0, dim)
    assert torch.allclose(project_sphere(Y, 2.0, dim), Y, atol=10 * torch.finfo(dtype).eps)


def test_project_sphere_whole_tensor_is_the_default():
    X = randn((3, 4), torch.float64, 0)
    assert torch.allclose(project_sphere(X), X / X.norm())


@pytest.mark.parametrize("dim", [None, -1, (0, 2)])
def test_project_sphere_gradcheck(dim):
    X = randn((2, 3, 2), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: project_sphere(X, 1.5, dim), (X,))


# poincare_exp and poincare_log


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.25, 1.0, 4.0]))
def test_poincare_exp_lands_in_the_ball(shape_dim, dtype, seed, c):
    shape, dim = shape_dim
    X = poincare_exp(randn(shape, dtype, seed, scale=3.0), c, dim)
    assert X.shape == shape and X.dtype == dtype
    assert bool((slice_norms(X, dim) <= 1 / math.sqrt(c)).all())


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.25, 1.0, 4.0]))
def test_poincare_exp_of_log_is_the_identity(shape_dim, dtype, seed, c):
    shape, dim = shape_dim
    # Points at up to 0.9 of the radius, where the log is well conditioned.
    X = randn(shape, dtype, seed)
    radius = 0.9 * torch.rand(slice_norms(X, dim).shape, dtype=dtype) / math.sqrt(c)
    X = project_sphere(X, 1.0, dim) * radius.reshape(_keepdim_shape(shape, dim))
    assert torch.allclose(poincare_exp(poincare_log(X, c, dim), c, dim), X, atol=1e-5)


def _keepdim_shape(shape, dim):
    wanted = range(len(shape)) if dim is None else (dim,) if isinstance(dim, int) else dim
    wanted = {d % len(shape) for d in wanted}
    return tuple(1 if i in wanted else n for i, n in enumerate(shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_poincare_log_of_exp_is_the_identity(dtype):
    V = randn((5, 3), dtype, 2)
    assert torch.allclose(poincare_log(poincare_exp(V, 2.0), 2.0), V, atol=default_atol(dtype))


def test_poincare_exp_matches_its_formula():
    V = randn((4, 3), torch.float64, 3)
    u = math.sqrt(2.0) * V.norm(dim=-1, keepdim=True)
    assert torch.allclose(poincare_exp(V, 2.0), torch.tanh(u) * V / u)


@pytest.mark.parametrize("dtype", DTYPES)
def test_poincare_maps_are_smooth_across_the_taylor_switch(dtype):
    # Note [Smooth ratio at 0]: the series takes over below u² = √eps; both sides agree.
    switch = torch.finfo(dtype).eps ** 0.25
    u = torch.tensor([[0.999 * switch], [1.001 * switch]], dtype=dtype)
    for f, exact in [(poincare_exp, torch.tanh), (poincare_log, torch.atanh)]:
        ratio = f(u, 1.0) / u
        assert torch.allclose(ratio, exact(u) / u, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_poincare_exp_at_zero_is_zero_with_identity_jacobian():
    V = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(poincare_exp(V), V)
    J = torch.autograd.functional.jacobian(poincare_exp, V)
    assert torch.allclose(J, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-5, 1.0])
@pytest.mark.parametrize("f", [poincare_exp, poincare_log], ids=["exp", "log"])
def test_poincare_maps_gradcheck(f, scale):
    V = randn((3, 2), torch.float64, 4, scale=0.2 * scale).requires_grad_()
    assert torch.autograd.gradcheck(lambda V: f(V, 1.5, -1), (V,))


# softplus_inverse


@pytest.mark.parametrize("dtype", DTYPES)
def test_softplus_inverse_is_a_right_inverse_over_many_scales(dtype):
    Y = torch.logspace(-6, 6, 49, dtype=dtype)
    X = softplus_inverse(Y)
    assert bool(X.isfinite().all())
    assert torch.allclose(torch.nn.functional.softplus(X), Y, rtol=default_atol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softplus_inverse_does_not_overflow(dtype):
    Y = torch.tensor([100.0, 1e20, torch.finfo(dtype).max], dtype=dtype)
    assert torch.equal(softplus_inverse(Y), Y)


def test_softplus_inverse_matches_the_naive_formula_where_it_is_safe():
    Y = torch.linspace(0.01, 20, 50, dtype=torch.float64)
    assert torch.allclose(softplus_inverse(Y), torch.log(torch.expm1(Y)))


def test_softplus_inverse_gradcheck():
    Y = torch.rand(6, dtype=torch.float64).add(0.1).requires_grad_()
    assert torch.autograd.gradcheck(softplus_inverse, (Y,))


# project_simplex


def bisection_projection(X, steps=200):
    """Reference: the threshold θ with Σ max(x - θ, 0) = 1, found by bisection."""
    low = X.amin(dim=-1, keepdim=True) - 1
    high = X.amax(dim=-1, keepdim=True)
    for _ in range(steps):
        mid = (low + high) / 2
        above = (X - mid).clamp_min(0).sum(dim=-1, keepdim=True) > 1
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    return (X - (low + high) / 2).clamp_min(0)


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.1, 1.0, 10.0]))
def test_project_simplex_lands_on_the_simplex(shape_dim, dtype, seed, scale):
    shape, _ = shape_dim
    dim = -1 if len(shape) < 2 else 0
    P = project_simplex(randn(shape, dtype, seed, scale), dim)
    assert P.shape == shape and P.dtype == dtype
    assert bool((P >= 0).all())
    sums = P.sum(dim=dim)
    assert torch.allclose(sums, torch.ones_like(sums), atol=default_atol(dtype))


@given(st.integers(1, 6), seeds, st.sampled_from([0.1, 1.0, 10.0]))
def test_project_simplex_matches_bisection(n, seed, scale):
    X = randn((3, n), torch.float64, seed, scale)
    assert torch.allclose(project_simplex(X), bisection_projection(X), atol=1e-12)


@given(st.integers(1, 6), dtypes, seeds)
def test_project_simplex_keeps_members(n, dtype, seed):
    P = torch.softmax(randn((2, n), dtype, seed), dim=-1)
    assert torch.allclose(project_simplex(P), P, atol=10 * torch.finfo(dtype).eps)


def test_project_simplex_is_the_nearest_point():
    # Optimality: <x - p, q - p> <= 0 for every q on the simplex.
    X = randn((5,), torch.float64, 5, scale=2.0)
    P = project_simplex(X)
    Q = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((100,))
    assert bool((((X - P) * (Q - P)).sum(dim=-1) <= 1e-12).all())


def test_project_simplex_example():
    P = project_simplex(torch.tensor([[0.5, 1.0, -1.0], [3.0, 3.0, 3.0]]))
    assert torch.allclose(P, torch.tensor([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_project_simplex_gradcheck():
    X = randn((2, 4), torch.float64, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: project_simplex(X, dim=0), (X,))
