"""Maps of tether.functional._norms against torch.linalg: norms, weight normalization, power
iteration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import (
    largest_singular_value,
    norm_except_dim,
    power_iteration,
    singular_value_estimate,
    weight_normalize,
)

REAL = [torch.float32, torch.float64]
DTYPES = [*REAL, torch.complex64, torch.complex128]
# Matrix shapes: square, tall, wide, a row, a column, batched.
SHAPES = [(4, 4), (6, 3), (3, 6), (1, 5), (5, 1), (2, 3, 4), (2, 1, 3, 3)]

pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int = 1) -> float:
    return 100 * n * torch.finfo(dtype).eps


def randn(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def with_singular_values(values, m: int, n: int, dtype: torch.dtype, seed: int = 0):
    """An ``(m, n)`` matrix with the given singular values, and its left and right vectors."""
    k = len(values)
    U = torch.linalg.qr(randn((m, k), dtype, seed)).Q
    V = torch.linalg.qr(randn((n, k), dtype, seed + 1)).Q
    s = torch.tensor(values, dtype=dtype)
    return U @ torch.diag(s) @ V.mH, U, V


@st.composite
def tensors(draw):
    """A tensor of 1 to 4 small dimensions, float32 or float64, and a dim (or None) of it."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(REAL))
    dim = draw(st.sampled_from([None, *range(-ndim, ndim)]))
    return randn(shape, dtype, draw(st.integers(0, 2**16))), dim


@st.composite
def matrices(draw):
    """A small matrix or batch of matrices, real or complex."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    return randn((*batch, m, n), dtype, draw(st.integers(0, 2**16)))


def other_dims(ndim: int, dim: int | None) -> list[int]:
    """The dimensions norm_except_dim reduces: all but ``dim`` (all for None and -1)."""
    if dim is None or dim == -1:
        return list(range(ndim))
    return [d for d in range(ndim) if d != dim % ndim]


# norm_except_dim


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3, None])
def test_norm_except_dim_is_linalgs_vector_norm_over_the_other_dims(dim, dtype):
    X = randn((3, 4, 5), dtype)
    expected = torch.linalg.vector_norm(X, dim=other_dims(3, dim), keepdim=dim not in (None, -1))
    result = norm_except_dim(X, dim)
    assert result.shape == expected.shape and result.dtype == expected.dtype
    assert torch.allclose(result, expected, rtol=tolerance(dtype))


# weight_normalize


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("dim", [0, 1, 2, -2, None])
def test_weight_normalize_is_g_times_v_over_its_norm(dim, dtype):
    v = randn((3, 4, 2), dtype)
    g = torch.rand(norm_except_dim(v, dim).shape, dtype=dtype) + 0.5
    norm = torch.linalg.vector_norm(v, dim=other_dims(3, dim), keepdim=True)
    expected = g * v / norm
    assert torch.allclose(weight_normalize(g, v, dim), expected, rtol=tolerance(dtype))


@given(example=tensors())
def test_weight_normalize_of_its_right_inverse_is_the_identity(example):
    X, dim = example
    g = norm_except_dim(X, dim)
    W = weight_normalize(g, X, dim)
    assert W.shape == X.shape and W.dtype == X.dtype
    assert torch.allclose(W, X, atol=tolerance(X.dtype), rtol=tolerance(X.dtype))


@given(example=tensors())
def test_weight_normalize_has_norm_g(example):
    X, dim = example
    g = randn(norm_except_dim(X, dim).shape, X.dtype).abs() + 0.5
    W = weight_normalize(g, X, dim)
    assert torch.allclose(norm_except_dim(W, dim), g, rtol=tolerance(X.dtype))


@pytest.mark.parametrize("dim", [0, 1, 2, -2, None])
def test_weight_normalize_gradcheck(dim):
    v = randn((3, 4, 2), torch.float64).requires_grad_()
    g = (norm_except_dim(v, dim).detach() + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda g, v: weight_normalize(g, v, dim), (g, v))


# power_iteration and singular_value_estimate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_power_step_is_normalize_w_v_then_normalize_wh_u(shape, dtype):
    W = randn(shape, dtype)
    u, v = randn(shape[:-1], dtype, 1), randn((*shape[:-2], shape[-1]), dtype, 2)
    expected_u = F.normalize((W @ v[..., None])[..., 0], dim=-1)
    expected_v = F.normalize((W.mH @ expected_u[..., None])[..., 0], dim=-1)
    new_u, new_v = power_iteration(W, u, v, 1)
    atol = tolerance(dtype, max(shape))
    assert torch.allclose(new_u, expected_u, atol=atol)
    assert torch.allclose(new_v, expected_v, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_iteration_finds_the_top_singular_vectors_of_svd(dtype):
    # Singular values 3, 1, 0.5: each step shrinks the error by 1/3.
    W, U, V = with_singular_values([3.0, 1.0, 0.5], 5, 4, dtype)
    u, v = power_iteration(W, randn(5, dtype, 3), randn(4, dtype, 4), 100)
    atol = tolerance(dtype, 5)
    # Unit vectors equal up to a phase: |<u, U[:, 0]>| = 1.
    assert torch.vdot(U[:, 0], u).abs().item() == pytest.approx(1.0, abs=atol)
    assert torch.vdot(V[:, 0], v).abs().item() == pytest.approx(1.0, abs=atol)
    estimate = singular_value_estimate(W, u, v)
    assert torch.allclose(estimate, torch.tensor(3.0, dtype=dtype), atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_power_iteration_is_the_power_iteration_of_each_matrix(dtype):
    W = randn((3, 4, 5), dtype)
    u, v = randn((3, 4), dtype, 1), randn((3, 5), dtype, 2)
    U, V = power_iteration(W, u, v, 3)
    U_each, V_each = torch.vmap(power_iteration, in_dims=(0, 0, 0, None))(W, u, v, 3)
    atol = tolerance(dtype, 5)
    assert torch.allclose(U, U_each, atol=atol) and torch.allclose(V, V_each, atol=atol)
    estimate = singular_value_estimate(W, U, V)
    each = torch.vmap(singular_value_estimate)(W, U, V)
    assert torch.allclose(estimate, each, atol=atol)


def test_power_iteration_does_not_modify_its_inputs():
    W, u, v = randn((4, 3), torch.float32), randn(4, torch.float32, 1), randn(3, torch.float32, 2)
    u0, v0 = u.clone(), v.clone()
    power_iteration(W, u, v, 2)
    assert torch.equal(u, u0) and torch.equal(v, v0)


def test_power_iteration_of_a_zero_matrix_stays_finite():
    # eps floors the norms: a zero vector is not divided by zero.
    u, v = power_iteration(torch.zeros(3, 2), torch.ones(3), torch.ones(2), 2)
    assert torch.equal(u, torch.zeros(3)) and torch.equal(v, torch.zeros(2))


def test_power_iteration_computes_in_the_dtype_of_the_matrix():
    # Vectors kept as state may be stored in a lower precision than the weight is computed in.
    W = randn((4, 3), torch.float64)
    u, v = power_iteration(W, torch.ones(4, dtype=torch.float16), torch.ones(3), 1)
    assert u.dtype == v.dtype == torch.float64
    assert singular_value_estimate(W, u.half(), v.float()).dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_singular_value_estimate_is_uh_w_v(shape, dtype):
    W = randn(shape, dtype)
    u, v = randn(shape[:-1], dtype, 1), randn((*shape[:-2], shape[-1]), dtype, 2)
    expected = torch.linalg.vecdot(u, (W @ v[..., None])[..., 0])  # conjugates u
    result = singular_value_estimate(W, u, v)
    assert result.shape == shape[:-2]
    assert torch.allclose(result, expected, atol=tolerance(dtype, max(shape)))


@given(W=matrices())
def test_the_estimate_from_unit_vectors_is_at_most_the_largest_singular_value(W):
    u = F.normalize(randn(W.shape[:-1], W.dtype, 1), dim=-1)
    v = F.normalize(randn((*W.shape[:-2], W.shape[-1]), W.dtype, 2), dim=-1)
    bound = torch.linalg.svdvals(W)[..., 0] * (1 + tolerance(W.dtype, max(W.shape)))
    assert (singular_value_estimate(W, u, v).abs() <= bound).all()


@given(W=matrices())
def test_power_iteration_estimate_is_below_and_near_the_largest_singular_value(W):
    u = torch.ones(W.shape[:-1], dtype=W.dtype)
    v = torch.ones(*W.shape[:-2], W.shape[-1], dtype=W.dtype)
    u, v = power_iteration(W, u, v, 200)
    estimate = singular_value_estimate(W, u, v)
    exact = torch.linalg.svdvals(W)[..., 0]
    assert estimate.shape == W.shape[:-2] and estimate.dtype == W.dtype
    assert (estimate.abs() <= exact * (1 + tolerance(W.dtype, max(W.shape)))).all()
    assert torch.allclose(estimate.abs(), exact, rtol=1e-2)


def test_singular_value_estimate_gradcheck():
    W = randn((4, 3), torch.float64).requires_grad_()
    u = F.normalize(randn(4, torch.float64, 1), dim=0)
    v = F.normalize(randn(3, torch.float64, 2), dim=0)
    assert torch.autograd.gradcheck(lambda W: singular_value_estimate(W, u, v), (W,))


# largest_singular_value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_largest_singular_value_is_the_first_of_svdvals(shape, dtype):
    W = randn(shape, dtype)
    result = largest_singular_value(W)
    expected = torch.linalg.svdvals(W)[..., 0]
    assert result.shape == shape[:-2] and result.dtype == expected.dtype
    assert torch.allclose(result, expected, rtol=tolerance(expected.dtype, max(shape)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_singular_value_gradient_is_the_top_singular_pair(dtype):
    # d sigma_1 / dW = u_1 v_1ᴴ where sigma_1 is simple.
    W, U, V = with_singular_values([3.0, 1.0, 0.5], 5, 4, dtype)
    W.requires_grad_()
    largest_singular_value(W).backward()
    expected = torch.outer(U[:, 0], V[:, 0].conj())
    assert W.grad is not None
    assert torch.allclose(W.grad, expected, atol=tolerance(dtype, 5))


def test_largest_singular_value_gradcheck():
    W = randn((2, 4, 3), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(largest_singular_value, (W,))
