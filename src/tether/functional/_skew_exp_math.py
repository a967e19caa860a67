"""The arithmetic of the exponential of a skew matrix from one eigendecomposition: its value
and its gradient, without autograd (``_skew_exp`` wraps them for autograd and the compiler)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["exponential", "gradient", "largest_angle", "powers"]

# Note [Exponential of a skew matrix]
#     For a skew-symmetric (skew-Hermitian) A, A² = -S with S = AᴴA Hermitian and positive
#     semidefinite, so the even and odd terms of the exponential series are functions of S:
#         exp(A) = cos(√S) + A sinc(√S) = I + V f(Λ) Vᴴ + W s(Λ) Vᴴ,    W = A V,
#     with S = V Λ Vᴴ, f(λ) = cos√λ - 1 and s(λ) = sin√λ / √λ. One Hermitian
#     eigendecomposition and three matrix products replace scaling and squaring's ~10
#     products, and the backward (Note [Gradient of the skew exponential]) takes five more,
#     where torch.linalg.matrix_exp's backward exponentiates a 2n x 2n block matrix. f and s
#     are entire functions of λ, so the eigenvalues (paired, often equal) need no care here;
#     writing cos - 1 rather than cos keeps the error proportional to A near the identity.
#
#     Accuracy: eigh resolves the eigenvalues of S to eps ‖S‖ = eps ‖A‖₂², which is the
#     error this formula makes where A is small, against eps ‖A‖ for scaling and squaring.
#     When ‖A‖₂ > _MAX_ANGLE the forward exponentiates A / 2ᵏ and squares k times, which
#     brings the error back to order eps ‖A‖ (the scaling divides it by 4ᵏ, the squarings
#     double it k times). k is read from the data (.item()), which torch.compile cannot
#     trace: see Note [The skew exponential under torch.compile] in _skew_exp.py.
#
#     Speed (benchmarks/skew_exp.py, one thread): on a CPU an eigendecomposition costs a
#     few matrix products, so forward plus backward overtake scaling and squaring from
#     products only for large n (CPU_EIGH_MIN in _skew_exp.py, where "auto" switches), with
#     a fifth of torch.linalg.matrix_exp's peak memory. At small n the time goes to the number
#     of operations more than to their size, which is why the skew part is taken inside the
#     autograd Function and why small angles skip the close pairs' indexing. On CUDA eigh is
#     slow next to matrix products and synchronises with the host, so "auto" takes the
#     products there (Note [Choosing the algorithm] in _skew_exp.py).

# Note [Gradient of the skew exponential]
#     Q = I + F + A D with F = f(S), D = s(S), S = AᴴA. For a cotangent G of Q,
#         Ā = G D + A (S̄ + S̄ᴴ),   S̄ = V (Γ_f ∘ (Vᴴ G V) + Γ_s ∘ (Vᴴ Aᴴ G V)) Vᴴ,
#     by the Daleckii-Krein formula for the spectral functions f and s (see Note [Gradients
#     of spectral functions] in _symmetric.py), where Γ_g[i, j] = (g(λᵢ) - g(λⱼ)) / (λᵢ - λⱼ)
#     is g's divided difference, g'(λᵢ) when λᵢ = λⱼ. Both terms start from G V:
#     Ā = ((G V) s(Λ) + W (M + Mᴴ)) Vᴴ with M the bracket, five products in all. This is the
#     exact gradient of A ↦ I + f(AᴴA) + A s(AᴴA), which equals exp(A) on the skew matrices;
#     skew_matrix_exp applies it to the skew part of its input, so what it returns is the
#     exact gradient of X ↦ exp((X - Xᴴ)/2) in every direction.
#
#     The divided differences are evaluated without cancellation. With θ = √λ, θ₊ = θᵢ + θⱼ,
#     θ₋ = θᵢ - θⱼ (so λᵢ - λⱼ = θ₊θ₋, exactly as computed):
#         Γ_f = -½ sinc(θ₊/2) sinc(θ₋/2)                 (an identity; no branches)
#         Γ_s = (s(λᵢ) - s(λⱼ)) / (θ₊θ₋)                 when min(|θ₊θ₋|, |θ₋|) ≥ τ,
#     which loses at most a factor 6/τ of precision (about 60 eps). The close pairs (the rule
#     rather than the exception: the eigenvalues of S come in equal pairs) are done in
#     float64, for both θ ≤ 1 + τ with the power series of s's divided difference in λ,
#         Γ_s = Σₘ (-1)ᵐ / (2m + 1)! Σ_{p+q=m-1} λᵢᵖ λⱼq     (at most 11 terms reach eps),
#     and otherwise with the identity, for u = θ₊/2 > 1 and v = θ₋/2,
#         Γ_s = (u cos u sinc v - sin u cos v) / (2u θᵢθⱼ),
#     whose only cancellation, near the roots of tan u = u, stays below eps / u², the scale.
#     When no angle exceeds _SERIES_ANGLE = 2 (the forward reads the largest), every pair
#     takes the series instead, in θ's own precision, by Horner's rule for divided
#     differences: its terms alternate and shrink from the first, |Γ_s| ≥ |s'(4)| > 1/10,
#     so nothing cancels, and the terms are as many as the largest λ needs for the dtype's
#     eps (one at A = 0, seven at θ = 2 in float32). That is a few passes over n x n and no
#     indexing of close pairs, which is what the backward of a small matrix, or of one near
#     its base point (freshly registered: A = 0, all pairs close), spends its time on.

# Largest ‖A‖₂ exponentiated without squaring (Note [Exponential of a skew matrix]).
_MAX_ANGLE = 8.0
# τ of Note [Gradient of the skew exponential]: closer pairs take the series or identity.
_CLOSE = 0.1
# Most terms of the series: enough for float64's eps when θ ≤ 2 (so also for the close
# pairs, θ ≤ 1 + τ).
_SERIES_TERMS = 11
# Largest θ for which the backward takes every pair from the series.
_SERIES_ANGLE = 2.0


def _sinc(x: Tensor) -> Tensor:
    """``sin(x) / x``, 1 at 0 (no autograd: the 0/0 it drops would poison a gradient)."""
    return torch.where(x == 0, 1.0, torch.sin(x) / x)


def _cos_minus_one(x: Tensor) -> Tensor:
    """``cos(x) - 1`` without cancellation near 0."""
    return -2.0 * torch.sin(x / 2) ** 2


def largest_angle(theta: Tensor) -> float:
    """The largest angle, ``‖A‖₂`` (read from the device)."""
    return theta.max().item() if theta.numel() else 0.0


def _squarings(theta: Tensor) -> int:
    """How many times to halve ``A`` so that its 2-norm is at most ``_MAX_ANGLE``."""
    largest = largest_angle(theta)
    if not largest > _MAX_ANGLE:  # also catches NaN, which squaring would not help
        return 0
    return math.ceil(math.log2(largest / _MAX_ANGLE))


def _series_terms(x_max: float, eps: float) -> int:
    """Terms of the series of ``Γ_s`` that reach a relative error ``eps`` for ``λ ≤ x_max ≤ 4``."""
    # The terms alternate and shrink (each is at most 2λ / (2m + 2)(2m + 3) times the one
    # before), so the first term left out bounds the error, and |Γ_s| ≥ |s'(4)| > 1/10.
    for terms in range(1, _SERIES_TERMS):
        if (terms + 1) * x_max**terms / math.factorial(2 * terms + 3) <= eps / 16:
            return terms
    return _SERIES_TERMS


def _sinc_slope_series(x: Tensor, y: Tensor, terms: int) -> Tensor:
    """``Γ_s`` for ``λᵢ = x``, ``λⱼ = y`` from its series in ``λ`` (``x``, ``y`` broadcast)."""
    # Σₘ cₘ hₘ₋₁(x, y), cₘ = (-1)ᵐ / (2m + 1)!, hₘ₋₁ the sum of the monomials of degree m - 1,
    # by Horner's rule for divided differences: with B_M = c_M and Bⱼ = cⱼ + x Bⱼ₊₁, the sum
    # is D₀, where D_{M-1} = B_M and Dⱼ = Bⱼ₊₁ + y Dⱼ₊₁. B depends on x alone.
    coefficients = [(-1) ** m / math.factorial(2 * m + 1) for m in range(terms + 1)]
    B = torch.full_like(x, coefficients[terms])
    series = B
    for j in reversed(range(terms - 1)):
        B = B * x + coefficients[j + 1]
        series = torch.addcmul(B, y, series)
    return series


def _sinc_slope_close(a: Tensor, b: Tensor, eps: float | None = None) -> Tensor:
    """``(sinc(a) - sinc(b)) / (a² - b²)`` for close ``a, b ≥ 0``, float64 (the series and
    identity of Note [Gradient of the skew exponential]), to a relative error ``eps`` (or
    float64's when ``eps`` is None, which reads no data from the device)."""
    u, v = (a + b) / 2, (a - b) / 2
    near = u <= 1
    x, y = a * a, b * b
    if eps is None:
        terms = _SERIES_TERMS
    else:
        x_max = torch.where(near, torch.maximum(x, y), 0.0).max().item() if x.numel() else 0.0
        terms = _series_terms(x_max, eps)
    series = _sinc_slope_series(x, y, terms)
    if eps is not None and bool(near.all()):
        return series
    closed = (u * torch.cos(u) * torch.sinc(v / math.pi) - torch.sin(u) * torch.cos(v)) / (
        2 * u * (a * b)
    )
    return torch.where(near, series, closed)


def _divided_differences(theta: Tensor, largest: float | None = None) -> tuple[Tensor, Tensor]:
    """``Γ_f`` and ``Γ_s`` of Note [Gradient of the skew exponential] for angles ``θ``, the
    largest of which is ``largest`` when given."""
    # torch.sinc(x) is sin(πx) / (πx): work with θ / 2π. In place where it saves a pass.
    half = theta * (0.5 / math.pi)
    sigma = half.unsqueeze(-1) + half.unsqueeze(-2)
    delta = half.unsqueeze(-1) - half.unsqueeze(-2)
    gamma_f = torch.sinc(sigma).mul_(torch.sinc(delta)).mul_(-0.5)
    if largest is not None and largest <= _SERIES_ANGLE:
        # Every pair from the series, in θ's precision: fewer passes than the quotients and
        # the close pairs below when few terms do, and none of their indexing.
        x = theta.square()
        terms = _series_terms(largest**2, torch.finfo(theta.dtype).eps)
        gamma_s = _sinc_slope_series(x.unsqueeze(-1), x.unsqueeze(-2), terms)
        return gamma_f, gamma_s.expand_as(gamma_f)
    s = torch.sinc(theta / math.pi)
    gap = sigma.mul_(delta).mul_(4 * math.pi**2)  # λᵢ - λⱼ without cancellation
    gamma_s = (s.unsqueeze(-1) - s.unsqueeze(-2)).div_(gap)
    # min(|λᵢ - λⱼ|, |θᵢ - θⱼ|) < τ is |λᵢ - λⱼ| < τ max(1, θᵢ + θⱼ).
    close = torch.minimum(gap.abs_(), delta.abs_().mul_(2 * math.pi)) < _CLOSE
    pairs = theta.unsqueeze(-1).expand_as(close), theta.unsqueeze(-2).expand_as(close)
    try:
        index = close.nonzero(as_tuple=True)
    except RuntimeError:
        # Under torch.func.vmap (no batching rule for nonzero): every pair, then select.
        a, b = (p.to(torch.float64) for p in pairs)
        return gamma_f, torch.where(close, _sinc_slope_close(a, b).to(theta.dtype), gamma_s)
    a, b = (p[index].to(torch.float64) for p in pairs)
    eps = torch.finfo(theta.dtype).eps
    gamma_s[index] = _sinc_slope_close(a, b, eps).to(theta.dtype)
    return gamma_f, gamma_s


def _adjoint(X: Tensor) -> Tensor:
    """``Xᴴ`` with the conjugation carried out, for arithmetic (matrix products read a lazily
    conjugated view correctly): AOTAutograd runs custom operators with torch's Conjugate
    dispatch key excluded, where ``X - X.mH`` silently computes ``X - Xᵀ`` (torch 2.13)."""
    return X.mH.resolve_conj()


def _assemble(theta: Tensor, V: Tensor, W: Tensor) -> Tensor:
    """``I + V f(Λ) Vᴴ + W s(Λ) Vᴴ``, the exponential before any squaring."""
    Q = (V * _cos_minus_one(theta).unsqueeze(-2) + W * _sinc(theta).unsqueeze(-2)) @ V.mH
    Q.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return Q


def _square(Q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``Q`` squared ``k`` times, and the ``k`` matrices squared, stacked: ``(*, k, n, n)``."""
    squares = [Q]
    for _ in range(k):
        squares.append(squares[-1] @ squares[-1])
    if k:
        return squares[-1], torch.stack(squares[:-1], dim=-3)
    return Q, Q.new_zeros((*Q.shape[:-2], 0, *Q.shape[-2:]))


def exponential(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``exp(A)`` for ``A = (X - Xᴴ) / 2`` (Note [Exponential of a skew matrix]), with what
    :func:`gradient` needs: the angles ``θ``, ``V`` and ``W = A V`` of ``A / 2ᵏ``, and the
    ``k`` matrices squared, shape ``(*, k, n, n)``."""
    A = (X - _adjoint(X)) / 2
    L, V = torch.linalg.eigh(A.mH @ A)
    theta = L.clamp_min(0.0).sqrt()
    k = _squarings(theta)
    if k:
        A = A * 2.0**-k
        theta = theta * 2.0**-k
    W = A @ V
    Q, squared = _square(_assemble(theta, V, W), k)
    return Q, theta, V, W, squared


def powers(theta: Tensor, V: Tensor, W: Tensor, k: int) -> Tensor:
    """The ``k`` matrices that :func:`exponential` squared, recomputed from ``θ``, ``V``, ``W``."""
    if not k:
        return V.new_zeros((*V.shape[:-2], 0, *V.shape[-2:]))
    last, before = _square(_assemble(theta, V, W), k - 1)
    return torch.cat([before, last.unsqueeze(-3)], dim=-3)


def gradient(
    grad: Tensor, theta: Tensor, V: Tensor, W: Tensor, powers: Tensor, largest: float | None
) -> Tensor:
    """``X̄`` for ``A = (X - Xᴴ) / 2``: ``Ā`` of Note [Gradient of the skew exponential],
    through the squarings first."""
    k = powers.shape[-3]
    for i in reversed(range(k)):
        P = powers[..., i, :, :].mH
        grad = grad @ P + P @ grad
    GV = grad @ V
    gamma_f, gamma_s = _divided_differences(theta, largest)
    M = gamma_f * (V.mH @ GV) + gamma_s * (W.mH @ GV)
    A_bar = (GV * _sinc(theta).unsqueeze(-2) + W @ (M + _adjoint(M))) @ V.mH
    # Through the scaling by 2⁻ᵏ and the skew part.
    return (A_bar - _adjoint(A_bar)).mul_(2.0 ** -(k + 1))
