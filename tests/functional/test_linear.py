"""Maps of tether.functional._linear: factored products, GL+(n) pieces, Hurwitz pieces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import (
    dissipative,
    dissipative_inverse,
    factored,
    log_cholesky,
    log_cholesky_inverse,
    positive_triangular,
    positive_triangular_inverse,
    solve_lyapunov,
    special_orthonormalize,
    truncated_svd,
)

DTYPES = [torch.float32, torch.float64]
BATCHES = [(), (2,), (2, 1)]


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 100 * n * torch.finfo(dtype).eps


@st.composite
def square(draw, max_n: int = 5):
    """A Gaussian square matrix, batched or not, float32 or float64, from a seeded generator."""
    batch = draw(st.sampled_from(BATCHES))
    n = draw(st.integers(1, max_n))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(*batch, n, n, dtype=dtype, generator=generator)


@st.composite
def factors(draw):
    """``(U, s, V, rank)``, shapes ``(*, n, r)``, ``(*, r)``, ``(*, k, r)``: tall, wide, square."""
    batch = draw(st.sampled_from(BATCHES))
    n, k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    rank = draw(st.integers(1, min(n, k)))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    U = torch.randn(*batch, n, rank, dtype=dtype, generator=generator)
    s = torch.randn(*batch, rank, dtype=dtype, generator=generator)
    V = torch.randn(*batch, k, rank, dtype=dtype, generator=generator)
    return U, s, V, rank


def stable(Y: torch.Tensor) -> torch.Tensor:
    """A Hurwitz matrix of moderate condition, built from any square ``Y``."""
    return dissipative(Y / Y.shape[-1] ** 0.5) @ log_cholesky(Y.mT / Y.shape[-1] ** 0.5)


# factored and truncated_svd


@given(factors())
def test_factored_has_the_shape_rank_and_dtype(args):
    U, s, V, rank = args
    X = factored(U, s, V)
    assert X.shape == (*U.shape[:-1], V.shape[-2]) and X.dtype == U.dtype
    assert bool((torch.linalg.matrix_rank(X) <= rank).all())
    torch.testing.assert_close(X, U @ torch.diag_embed(s) @ V.mT)


@given(factors())
def test_truncated_svd_inverts_factored(args):
    U, s, V, rank = args
    X = factored(U, s, V)
    A, sigma, B = truncated_svd(X, rank)
    assert A.shape == U.shape and sigma.shape == s.shape and B.shape == V.shape
    assert A.is_contiguous() and B.is_contiguous()
    scale = max(float(X.abs().max()), 1.0)
    assert (factored(A, sigma, B) - X).abs().max() <= tolerance(X.dtype, 5) * scale


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)], ids=str)
def test_truncated_svd_gives_the_best_approximation(shape):
    X = torch.randn(shape, dtype=torch.float64)
    sigma = torch.linalg.svdvals(X)
    approximation = factored(*truncated_svd(X, rank=2))
    error = torch.linalg.matrix_norm(X - approximation)
    torch.testing.assert_close(error, torch.linalg.vector_norm(sigma[..., 2:], dim=-1))


@pytest.mark.parametrize("rank", [0, 4])
def test_truncated_svd_rejects_a_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"1 <= rank <= min\(n, k\).*rank " + str(rank)):
        truncated_svd(torch.randn(3, 5), rank)


# special_orthonormalize


@given(square())
def test_special_orthonormalize_lands_in_so_n(X):
    Q = special_orthonormalize(X)
    n = X.shape[-1]
    eye = torch.eye(n, dtype=X.dtype)
    assert Q.shape == X.shape and Q.dtype == X.dtype
    assert (Q.mT @ Q - eye).abs().max() <= tolerance(X.dtype, n)
    assert (torch.linalg.det(Q) - 1).abs().max() <= tolerance(X.dtype, n)


@given(square())
def test_special_orthonormalize_is_the_identity_on_so_n(X):
    Q = special_orthonormalize(X)
    assert (special_orthonormalize(Q) - Q).abs().max() <= tolerance(X.dtype, X.shape[-1])


def test_special_orthonormalize_is_continuous_across_singular_matrices():
    X = torch.randn(4, 4, dtype=torch.float64)
    # Move the last column through the span of the others: det X changes sign at t = 0.
    inside = X[:, :3] @ torch.randn(3, dtype=torch.float64)
    normal = torch.linalg.qr(X[:, :3], mode="complete").Q[:, 3]
    before, after = X.clone(), X.clone()
    before[:, 3] = inside - 1e-6 * normal
    after[:, 3] = inside + 1e-6 * normal
    assert torch.linalg.det(before) * torch.linalg.det(after) < 0
    assert (special_orthonormalize(before) - special_orthonormalize(after)).abs().max() < 1e-9


# positive_triangular


@given(square())
def test_positive_triangular_round_trip(X):
    R = positive_triangular(X)
    assert R.dtype == X.dtype and torch.equal(R, R.triu())
    assert bool((R.diagonal(dim1=-2, dim2=-1) > 0).all())
    torch.testing.assert_close(positive_triangular(positive_triangular_inverse(R)), R)
    logdet = torch.linalg.slogdet(R).logabsdet
    atol = tolerance(X.dtype, X.shape[-1]) * (1 + X.diagonal(dim1=-2, dim2=-1).abs().sum())
    assert (logdet - X.diagonal(dim1=-2, dim2=-1).sum(-1)).abs().max() <= atol


# log_cholesky and dissipative


@given(square())
def test_log_cholesky_is_positive_definite_and_inverted(X):
    P = log_cholesky(X)
    assert P.dtype == X.dtype and torch.equal(P, P.mT)
    assert bool((torch.linalg.eigvalsh(P) > 0).all())
    assert torch.equal(log_cholesky(X.tril()), P)  # the upper triangle is not read
    Y = log_cholesky_inverse(P)
    assert torch.equal(Y, Y.tril())
    assert (log_cholesky(Y) - P).abs().max() <= tolerance(X.dtype, 5) * P.abs().max()


@given(square())
def test_dissipative_has_a_negative_definite_symmetric_part(X):
    M = dissipative(X)
    assert M.shape == X.shape and M.dtype == X.dtype
    assert bool((torch.linalg.eigvalsh(M + M.mT) < 0).all())
    back = dissipative(dissipative_inverse(M))
    assert (back - M).abs().max() <= tolerance(X.dtype, 5) * M.abs().max()


def test_dissipative_inverse_rejects_a_matrix_with_an_indefinite_symmetric_part():
    with pytest.raises(torch.linalg.LinAlgError):
        dissipative_inverse(torch.eye(3))


# solve_lyapunov


@given(square(max_n=4))
def test_solve_lyapunov_solves_the_equation(Y):
    A = stable(Y)
    C = -torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
    X = solve_lyapunov(A, C)
    assert X.shape == A.shape and X.dtype == A.dtype
    residual = (A @ X + X @ A.mT - C).abs().max()
    assert residual <= 1e3 * tolerance(A.dtype, 4) * max(1.0, float(X.abs().max()))


def test_solve_lyapunov_on_a_defective_matrix():
    A = torch.tensor([[-1.0, 100.0], [0.0, -1.0]], dtype=torch.float64)
    C = -torch.eye(2, dtype=torch.float64)
    X = solve_lyapunov(A, C)
    torch.testing.assert_close(A @ X + X @ A.mT, C)
    assert bool((torch.linalg.eigvalsh(X) > 0).all())


@pytest.mark.parametrize(
    "A", [torch.eye(2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])], ids=["unstable", "imaginary"]
)
def test_solve_lyapunov_rejects_a_matrix_that_is_not_hurwitz(A):
    with pytest.raises(ValueError, match="Hurwitz"):
        solve_lyapunov(A, -torch.eye(2))


# gradients


@pytest.mark.parametrize(
    "f",
    [special_orthonormalize, positive_triangular, log_cholesky, dissipative],
    ids=lambda f: f.__name__,
)
def test_gradcheck_of_square_maps(f):
    X = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (X,))


def test_gradcheck_of_factored():
    U = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    V = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(factored, (U, s, V))


def test_gradcheck_of_solve_lyapunov():
    A = stable(torch.randn(3, 3, dtype=torch.float64)).detach().requires_grad_()
    C = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve_lyapunov, (A, C))
