"""Maps onto symmetric, skew, positive definite and positive semidefinite matrices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from tether.constraints import default_atol
from tether.functional import (
    fixed_rank_psd,
    fixed_rank_psd_factors,
    gram,
    gram_factor,
    orthonormalize,
    skew_part,
    spd_exp,
    spd_log,
    spd_softplus,
    spd_softplus_inverse,
    symmetric_part,
)

# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

REAL = [torch.float32, torch.float64]
DTYPES = [*REAL, torch.complex64, torch.complex128]


def atol(X: torch.Tensor) -> float:
    """sqrt(eps) of the dtype, scaled by the square root of the size."""
    return default_atol(X.dtype) * math.sqrt(X.shape[-1])


def is_hermitian(X: torch.Tensor) -> bool:
    return torch.equal(X, X.mH)


def eigenvalues(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(X)


def psd_member(shape, rank, dtype, generator):
    """A PSD matrix of rank ``rank`` with eigenvalues of order one."""
    *batch, n, _ = shape
    Q = orthonormalize(torch.randn(*batch, n, rank, dtype=dtype, generator=generator))
    L = 0.5 + torch.rand(*batch, rank, generator=generator, dtype=torch.float64)
    return symmetric_part((Q * L.unsqueeze(-2).to(dtype)) @ Q.mH)


@st.composite
def squares(draw, dtypes=DTYPES):
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(*batch, n, n, dtype=dtype, generator=generator), generator


# symmetric_part, skew_part


@given(case=squares())
def test_symmetric_part_is_a_hermitian_projection(case):
    X, _ = case
    S = symmetric_part(X)
    assert S.shape == X.shape and S.dtype == X.dtype
    assert is_hermitian(S)
    assert torch.equal(symmetric_part(S), S)


@given(case=squares())
def test_skew_part_is_a_skew_hermitian_projection(case):
    X, _ = case
    A = skew_part(X)
    assert A.shape == X.shape and A.dtype == X.dtype
    assert torch.equal(A, -A.mH)
    assert torch.equal(skew_part(A), A)
    torch.testing.assert_close(symmetric_part(X) + A, X)


# spd_exp / spd_log, spd_softplus / spd_softplus_inverse


@pytest.mark.parametrize(
    ("forward", "inverse"), [(spd_exp, spd_log), (spd_softplus, spd_softplus_inverse)]
)
@given(case=squares())
def test_spd_maps_land_on_positive_definite_matrices(forward, inverse, case):
    X, _ = case
    A = forward(X)
    assert A.shape == X.shape and A.dtype == X.dtype
    assert is_hermitian(A)
    assert bool((eigenvalues(A) > 0).all())


@pytest.mark.parametrize(
    ("forward", "inverse"), [(spd_exp, spd_log), (spd_softplus, spd_softplus_inverse)]
)
@given(case=squares())
def test_spd_inverse_is_a_right_inverse(forward, inverse, case):
    X, generator = case
    A = psd_member(X.shape, X.shape[-1], X.dtype, generator)
    Y = inverse(A)
    assert Y.shape == A.shape and Y.dtype == A.dtype
    torch.testing.assert_close(forward(Y), A, atol=atol(A), rtol=0)


@pytest.mark.parametrize("inverse", [spd_log, spd_softplus_inverse])
@pytest.mark.parametrize("dtype", REAL)
def test_spd_inverse_raises_eigenvalues_to_the_documented_floor(inverse, dtype):
    # sym(X) has eigenvalues -3, 0 and 2: the floor is sqrt(eps) * 3.
    A = torch.diag(torch.tensor([-3.0, 0.0, 2.0], dtype=dtype))
    forward = spd_exp if inverse is spd_log else spd_softplus
    L = eigenvalues(forward(inverse(A)))
    floor = 3 * math.sqrt(torch.finfo(dtype).eps)
    torch.testing.assert_close(L, torch.tensor([floor, floor, 2.0], dtype=dtype))


@pytest.mark.parametrize("inverse", [spd_log, spd_softplus_inverse])
def test_spd_inverse_of_zero_is_finite(inverse):
    assert bool(torch.isfinite(inverse(torch.zeros(3, 3))).all())


# gram / gram_factor


@given(case=squares(), data=st.data())
def test_gram_is_psd_of_bounded_rank(case, data):
    X, generator = case
    n = X.shape[-1]
    rank = data.draw(st.integers(1, n))
    B = torch.randn(*X.shape[:-1], rank, dtype=X.dtype, generator=generator)
    A = gram(B)
    assert A.shape == X.shape and A.dtype == X.dtype
    assert is_hermitian(A)
    L = eigenvalues(A)
    scale = L.abs().amax().item()
    assert bool((L + atol(A) * scale >= 0).all())
    assert bool((L[..., :-rank].abs() <= atol(A) * scale).all())


@given(case=squares(), data=st.data())
def test_gram_factor_is_a_right_inverse(case, data):
    X, generator = case
    n = X.shape[-1]
    rank = data.draw(st.integers(1, n))
    A = psd_member(X.shape, rank, X.dtype, generator)
    B = gram_factor(A, rank)
    assert B.shape == (*X.shape[:-1], rank) and B.dtype == X.dtype
    torch.testing.assert_close(gram(B), A, atol=atol(A), rtol=0)
    torch.testing.assert_close(gram(gram_factor(A)), A, atol=atol(A), rtol=0)


def test_gram_factor_projects_onto_the_nearest_psd_matrix_of_bounded_rank():
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    A = Q @ torch.diag(torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=torch.float64)) @ Q.T
    nearest = Q @ torch.diag(torch.tensor([0.0, 0.0, 3.0, 5.0], dtype=torch.float64)) @ Q.T
    psd = Q @ torch.diag(torch.tensor([0.0, 1.0, 3.0, 5.0], dtype=torch.float64)) @ Q.T
    torch.testing.assert_close(gram(gram_factor(A, rank=2)), nearest)
    torch.testing.assert_close(gram(gram_factor(A + skew_part(torch.randn(4, 4)))), psd)


def test_gram_factor_without_rank_is_the_psd_square_root():
    A = psd_member((4, 4), 4, torch.float64, torch.Generator().manual_seed(0))
    R = gram_factor(A)
    assert torch.equal(R, R.mT)
    torch.testing.assert_close(R @ R, A)


# fixed_rank_psd / fixed_rank_psd_factors


@given(case=squares(), data=st.data())
def test_fixed_rank_psd_has_exactly_rank_positive_eigenvalues(case, data):
    X, generator = case
    n = X.shape[-1]
    rank = data.draw(st.integers(1, n))
    B = torch.randn(*X.shape[:-1], rank, dtype=X.dtype, generator=generator)
    s = torch.randn(*X.shape[:-2], rank, dtype=X.real.dtype, generator=generator)
    A = fixed_rank_psd(B, s)
    assert A.shape == X.shape and A.dtype == X.dtype
    assert is_hermitian(A)
    L = eigenvalues(A)
    torch.testing.assert_close(
        L[..., -rank:], torch.nn.functional.softplus(s).sort(dim=-1).values, atol=atol(A), rtol=0
    )
    assert bool((L[..., :-rank].abs() <= atol(A)).all())


@given(case=squares(), data=st.data())
def test_fixed_rank_psd_factors_are_a_right_inverse(case, data):
    X, generator = case
    n = X.shape[-1]
    rank = data.draw(st.integers(1, n))
    A = psd_member(X.shape, rank, X.dtype, generator)
    Q, s = fixed_rank_psd_factors(A, rank)
    assert Q.shape == (*X.shape[:-1], rank) and s.shape == (*X.shape[:-2], rank)
    torch.testing.assert_close(fixed_rank_psd(Q, s), A, atol=atol(A), rtol=0)


# Gradients


@pytest.mark.parametrize("forward", [symmetric_part, skew_part, spd_exp, spd_softplus, gram])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck_forward_maps(forward, dtype):
    X = torch.randn(3, 3, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(forward, (X,))


def test_gradcheck_fixed_rank_psd():
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_rank_psd, (B, s))


@pytest.mark.parametrize("inverse", [spd_log, spd_softplus_inverse])
def test_gradcheck_spd_inverses(inverse):
    A = psd_member((3, 3), 3, torch.float64, torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(inverse, (A.requires_grad_(),))


def test_spd_softplus_gradient_matches_autograd_through_eigh_at_distinct_eigenvalues():
    X = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    G = torch.randn(4, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad((spd_softplus(X) * G).sum(), X)
    L, Q = torch.linalg.eigh(symmetric_part(X))
    naive = (Q * torch.nn.functional.softplus(L).unsqueeze(-2)) @ Q.mT
    (expected,) = torch.autograd.grad((naive * G).sum(), X)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("forward", [spd_exp, spd_softplus])
@pytest.mark.parametrize(
    "X",
    [torch.eye(3), torch.zeros(3, 3), torch.diag(torch.tensor([1.0, 1.0, 2.0]))],
    ids=["identity", "zero", "repeated"],
)
def test_spd_maps_are_differentiable_at_repeated_eigenvalues(forward, X):
    # eigh's own backward gives NaN here; see Note [Gradients of spectral functions].
    X = X.to(torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(forward, (X,))


def test_spd_exp_gradient_matches_torch_matrix_exp():
    X = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    G = torch.randn(2, 5, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((spd_exp(X) * G).sum(), X)
    reference = torch.linalg.matrix_exp(symmetric_part(X))
    (expected,) = torch.autograd.grad((symmetric_part(reference) * G).sum(), X)
    torch.testing.assert_close(ours, expected)


def test_spd_exp_has_exact_second_derivatives_with_create_graph():
    X = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(spd_exp, (X,))
    H = torch.autograd.functional.hessian(lambda x: spd_exp(x).square().sum(), X)
    expected = torch.autograd.functional.hessian(
        lambda x: torch.linalg.matrix_exp(symmetric_part(x)).square().sum(), X
    )
    torch.testing.assert_close(H, expected)


def test_spd_softplus_second_derivative_raises_instead_of_coming_out_wrong():
    # X also reaches the loss directly: a constant gradient would give a wrong (not a
    # missing) second derivative, so it must fail loudly.
    X = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((spd_softplus(X) + X**2).sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match=r"spd_softplus\(\) has no second derivative"):
        torch.autograd.grad(grad.sum(), X)


@FORWARD_AD
@pytest.mark.parametrize(("forward", "f"), [(spd_exp, torch.exp), (spd_softplus, F.softplus)])
def test_spd_maps_forward_mode_matches_the_backward(forward, f):
    X = torch.randn(4, 4, dtype=torch.float64)
    V = symmetric_part(torch.randn(4, 4, dtype=torch.float64))
    _, tangent = torch.func.jvp(forward, (X,), (V,))

    def through_eigh(S):  # differentiable at the distinct eigenvalues of a random X
        L, Q = torch.linalg.eigh(S)
        return (Q * f(L).unsqueeze(-2)) @ Q.mT

    _, expected = torch.func.jvp(through_eigh, (symmetric_part(X),), (V,))
    torch.testing.assert_close(tangent, expected)


@FORWARD_AD
def test_spd_maps_refuse_forward_over_forward():
    X = torch.randn(3, 3, dtype=torch.float64)
    V = torch.eye(3, dtype=torch.float64)
    first = lambda x: torch.func.jvp(spd_softplus, (x,), (V,))[1]  # noqa: E731
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.jvp(first, (X,), (V,))


@pytest.mark.parametrize("forward", [spd_exp, spd_softplus])
def test_spd_maps_work_under_vmap_and_jacrev(forward):
    X = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(forward)(X), forward(X))
    J = torch.func.jacrev(forward)(X[0])
    assert J.shape == (4, 4, 4, 4) and bool(torch.isfinite(J).all())
