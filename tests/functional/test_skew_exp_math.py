"""The arithmetic of ``tether.functional._skew_exp_math``, tested directly: ``exponential``,
``powers`` and ``gradient`` against float64 (or 40-digit) references, and the helpers they
rest on (the number of squarings, the series of ``Γ_s`` and its length, the close pairs,
``cos - 1`` and ``sinc``), at the edges the notes name: ``A = 0``, repeated and nearly
repeated eigenvalues of ``S = AᴴA``, the threshold of squaring and the end of the series.

``tests/functional/test_skew_exp.py`` tests the public ``skew_matrix_exp`` built on these."""

from __future__ import annotations

import math

import pytest
import torch

from tether.functional import _skew_exp_math as skew_math
from tether.functional._skew_exp_math import exponential, gradient, largest_angle, powers

REAL = [torch.float32, torch.float64]
ALL = [*REAL, torch.complex64, torch.complex128]


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def wide(dtype: torch.dtype) -> torch.dtype:
    """The float64 dtype of the same kind (complex128 for complex)."""
    return torch.complex128 if dtype.is_complex else torch.float64


def skew_part(X: torch.Tensor) -> torch.Tensor:
    return (X - X.mH) / 2


def rotation_generator(angles: list[float], n: int, dtype: torch.dtype, seed: int = 0):
    """A real skew matrix with the given rotation angles (in 2 x 2 blocks, zero beyond them),
    in a random orthonormal basis, so that ``S = AᵀA`` has each ``angle²`` twice."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.zeros(n, n, dtype=torch.float64)
    for i, angle in enumerate(angles):
        A[2 * i, 2 * i + 1], A[2 * i + 1, 2 * i] = -angle, angle
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (Q @ A @ Q.mT).to(dtype)


def random_matrix(shape: tuple[int, ...], dtype: torch.dtype, norm: float, seed: int = 0):
    """A random matrix whose skew part has 2-norm ``norm``."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(shape, generator=generator, dtype=wide(dtype))
    A = skew_part(X)
    scale = torch.linalg.matrix_norm(A, ord=2).amax()
    return (X * (norm / scale) if scale > 0 else X).to(dtype)


# Inputs by name, each made in the dtype it is given. "repeated" and "nearly repeated" give
# eigenvalues of S that are equal in pairs and across blocks; "zero" has every angle 0;
# "beyond 8" needs squarings (Note [Exponential of a skew matrix]).
CASES = {
    "zero": lambda dtype: torch.zeros(4, 4, dtype=dtype),
    "one by one": lambda dtype: random_matrix((1, 1), dtype, 0.0),
    "repeated": lambda dtype: rotation_generator([1.3, 1.3], 5, dtype),
    "nearly repeated": lambda dtype: rotation_generator([1.3, 1.3 + 1e-9, 0.7], 6, dtype),
    "small": lambda dtype: random_matrix((5, 5), dtype, 1e-4),
    "random": lambda dtype: random_matrix((6, 6), dtype, 2.5),
    "at the threshold": lambda dtype: rotation_generator([8.0, 3.0], 4, dtype),
    "beyond 8": lambda dtype: random_matrix((5, 5), dtype, 20.0),
    "batched": lambda dtype: random_matrix((2, 3, 4, 4), dtype, 3.0),
}


def bound(dtype: torch.dtype, A: torch.Tensor, n: int) -> float:
    """The error the note allows for the exponential: ``eps ‖A‖₂²`` where ``‖A‖₂ ≤ 8``,
    ``eps ‖A‖₂`` (times the scaled one) with squarings; times a constant and ``n``."""
    norm = float(torch.linalg.matrix_norm(A.to(wide(dtype)), ord=2).amax()) if A.numel() else 0.0
    scaled = norm / 2 ** skew_math._squarings(torch.tensor([norm]))
    return 4 * n * eps_of(dtype) * max(1.0, scaled) * max(1.0, norm)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_exponential_matches_matrix_exp_in_float64(case, dtype):
    X = CASES[case](dtype)
    Q, *_ = exponential(X)
    expected = torch.linalg.matrix_exp(skew_part(X.to(wide(dtype))))
    tol = bound(dtype, skew_part(X), X.shape[-1])
    assert Q.dtype == X.dtype and Q.shape == X.shape
    torch.testing.assert_close(Q.to(wide(dtype)), expected, rtol=0, atol=tol)


def test_exponential_of_zero_is_the_identity_exactly():
    X = torch.zeros(2, 4, 4, dtype=torch.float64)
    Q, theta, _, W, squared = exponential(X)
    assert torch.equal(Q, torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    assert torch.equal(theta, torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(W, torch.zeros_like(W))
    assert squared.shape == (2, 0, 4, 4)


@pytest.mark.parametrize("dtype", REAL, ids=str)
def test_exponential_returns_the_angles_twice_each(dtype):
    angles = [0.4, 1.3, 2.9]
    _, theta, V, _, _ = exponential(rotation_generator(angles, 7, dtype))
    expected = torch.tensor(sorted([0.0, *angles, *angles]), dtype=dtype)
    # eigh resolves λ = θ² to eps ‖S‖; θ = √λ near 0 only to √(eps ‖S‖).
    tol = 16 * eps_of(dtype) * 9
    torch.testing.assert_close(theta[1:], expected[1:], rtol=0, atol=tol)
    assert float(theta[0]) <= math.sqrt(tol)
    eye = torch.eye(7, dtype=dtype)
    torch.testing.assert_close(V.mT @ V, eye, rtol=0, atol=16 * eps_of(dtype))


@pytest.mark.parametrize(
    ("norm", "k"), [(0.0, 0), (8.0, 0), (8.0 * (1 + 1e-6), 1), (16.0, 1), (20.0, 2), (100.0, 4)]
)
def test_exponential_squares_as_often_as_the_norm_needs(norm, k):
    X = rotation_generator([norm], 3, torch.float64)
    _, theta, V, W, squared = exponential(X)
    assert squared.shape == (k, 3, 3)
    assert float(theta.max()) <= 8.0 * (1 + 1e-12)
    torch.testing.assert_close(float(theta.max()) * 2**k, norm, rtol=1e-12, atol=0)
    # W is A V for the A that was exponentiated before squaring: A / 2ᵏ.
    A = skew_part(X) * 2.0**-k
    torch.testing.assert_close(W, A @ V, rtol=0, atol=16 * eps_of(torch.float64) * max(1, norm))


@pytest.mark.parametrize("case", ["zero", "random", "at the threshold", "beyond 8", "batched"])
def test_powers_are_the_matrices_exponential_squared(case):
    X = CASES[case](torch.float64)
    _, theta, V, W, squared = exponential(X)
    k = squared.shape[-3]
    assert torch.equal(powers(theta, V, W, k), squared)


def reference_gradient(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``X̄`` of ``<G, exp((X - Xᴴ) / 2)>`` by autograd through ``torch.linalg.matrix_exp``, in
    float64 (for complex tensors, autograd's conjugate Wirtinger convention, as tether's)."""
    X = X.detach().to(wide(X.dtype)).requires_grad_()
    Q = torch.linalg.matrix_exp(skew_part(X))
    (X_bar,) = torch.autograd.grad(Q, X, G.to(Q.dtype))
    return X_bar


@pytest.mark.parametrize("series", [False, True], ids=["quotients", "series-when-small"])
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_autograd_through_matrix_exp(case, dtype, series):
    X = CASES[case](dtype)
    G = random_matrix(X.shape, dtype, 1.0, seed=1)
    _, theta, V, W, squared = exponential(X)
    # With the largest angle given, the backward takes every pair from the series when no
    # angle exceeds 2; without it, always the quotients and the close pairs.
    largest = largest_angle(theta) if series else None
    got = gradient(G.clone(), theta, V, W, squared, largest)
    expected = reference_gradient(X, G)
    tol = bound(dtype, skew_part(X), X.shape[-1]) * (1 + 2 ** squared.shape[-3])
    assert got.dtype == X.dtype
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=0, atol=tol)


def test_gradient_is_skew_and_finite_at_zero():
    X = torch.zeros(5, 5, dtype=torch.float32)
    G = random_matrix((5, 5), torch.float32, 1.0, seed=1)
    _, theta, V, W, squared = exponential(X)
    for largest in (None, 0.0):
        X_bar = gradient(G.clone(), theta, V, W, squared, largest)
        assert bool(X_bar.isfinite().all())
        # exp(A) = I + A + ...: the gradient at 0 is the skew part of G.
        torch.testing.assert_close(X_bar, skew_part(G), rtol=0, atol=4 * eps_of(torch.float32))


def test_largest_angle_is_a_float_and_zero_for_no_angles():
    assert largest_angle(torch.tensor([0.5, 3.0, 1.0])) == 3.0
    assert largest_angle(torch.zeros(0)) == 0.0
    assert isinstance(largest_angle(torch.tensor([2.0])), float)


@pytest.mark.parametrize(
    ("largest", "k"),
    [(0.0, 0), (8.0, 0), (8.0001, 1), (16.0, 1), (16.0001, 2), (1000.0, 7), (math.nan, 0)],
)
def test_squarings_are_the_fewest_that_bring_the_angle_to_8(largest, k):
    assert skew_math._squarings(torch.tensor([0.1, largest])) == k


def test_squarings_of_no_angles_are_none():
    assert skew_math._squarings(torch.zeros(0)) == 0


def reference_sinc_slope(x: float, y: float) -> float:
    """``Γ_s = (s(x) - s(y)) / (x - y)``, ``s(λ) = sin√λ / √λ``, in 40-digit arithmetic
    (``s'`` from its series when ``x == y``)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    X, Y = mpmath.mpf(x), mpmath.mpf(y)

    def s(v):
        return mpmath.sin(mpmath.sqrt(v)) / mpmath.sqrt(v) if v else mpmath.mpf(1)

    if X == Y:
        terms = lambda m: (-1) ** m * m * X ** (m - 1) / mpmath.factorial(2 * m + 1)  # noqa: E731
        return float(mpmath.nsum(terms, [1, 60]))
    return float((s(X) - s(Y)) / (X - Y))


# (λᵢ, λⱼ) pairs up to λ = 4 (θ = 2), where the series serves every pair.
SERIES_PAIRS = [(0.0, 0.0), (0.0, 4.0), (4.0, 4.0), (1.0, 1.0), (1.0, 1.0 + 1e-9), (0.3, 2.7)]


@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize(("x", "y"), SERIES_PAIRS)
def test_series_with_its_own_length_reaches_eps(x, y, dtype):
    eps = eps_of(dtype)
    terms = skew_math._series_terms(max(x, y), eps)
    x_, y_ = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    got = skew_math._sinc_slope_series(x_, y_, terms)
    expected = reference_sinc_slope(float(x_), float(y_))
    assert abs(float(got) - expected) <= 8 * eps * abs(expected)


def test_series_length_grows_with_the_angle_and_stays_within_its_cap():
    for eps in (eps_of(torch.float32), eps_of(torch.float64)):
        lengths = [skew_math._series_terms(x, eps) for x in (0.0, 0.01, 0.5, 1.0, 2.0, 4.0)]
        assert lengths == sorted(lengths)
        assert lengths[0] == 1  # at A = 0 one term is exact
        assert lengths[-1] <= skew_math._SERIES_TERMS
    assert skew_math._series_terms(4.0, eps_of(torch.float64)) > skew_math._series_terms(
        4.0, eps_of(torch.float32)
    )


# Close (a, b) angle pairs: both at 0, equal, on either side of the switch from the series
# (u = (a + b) / 2 ≤ 1) to the closed form, and far out.
CLOSE_PAIRS = [
    (0.0, 0.0),
    (1e-9, 0.0),
    (0.02, 0.02),  # the closed form would lose a factor 1/u² here
    (0.5, 0.5),
    (1.0, 1.0),
    (1.0, 0.95),
    (1.05, 1.0),
    (1.05, 1.05),
    (4.4934, 4.4934),  # near a root of tan u = u, where the closed form cancels most
    (7.9, 7.85),
]


@pytest.mark.parametrize("with_eps", [False, True], ids=["float64 terms", "terms for eps"])
@pytest.mark.parametrize(("a", "b"), CLOSE_PAIRS)
def test_close_pairs_match_the_40_digit_reference(a, b, with_eps):
    eps = eps_of(torch.float64)
    got = skew_math._sinc_slope_close(
        torch.tensor([a], dtype=torch.float64),
        torch.tensor([b], dtype=torch.float64),
        eps if with_eps else None,
    )
    expected = reference_sinc_slope(a * a, b * b)
    scale = 1 / (1 + a * a + b * b)  # of Γ_s, which crosses 0 near the roots
    assert abs(float(got) - expected) <= 64 * eps * max(scale, abs(expected))


def test_close_pair_at_zero_is_s_prime_of_zero():
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(skew_math._sinc_slope_close(zero, zero)) == -1 / 6


@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize("x", [0.0, 1e-15, 1e-8, 1e-3, 1.0, 3.0])
def test_cos_minus_one_keeps_its_relative_accuracy_near_zero(x, dtype):
    x_ = torch.tensor(x, dtype=dtype)
    got = float(skew_math._cos_minus_one(x_))
    expected = -2 * math.sin(float(x_) / 2) ** 2  # cos x - 1 without cancellation, float64
    assert abs(got - expected) <= 4 * eps_of(dtype) * abs(expected)


def test_sinc_is_one_at_zero_and_finite_everywhere():
    x = torch.tensor([0.0, 1e-30, 1e-8, 1.0, math.pi], dtype=torch.float64)
    got = skew_math._sinc(x)
    assert float(got[0]) == 1.0
    expected = torch.tensor([1.0, 1.0, 1.0, math.sin(1.0), 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=4 * eps_of(torch.float64), atol=1e-15)
