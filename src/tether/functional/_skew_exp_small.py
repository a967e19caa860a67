"""Closed forms of the exponential of small skew-symmetric (skew-Hermitian) matrices, n ≤ 3:
elementwise arithmetic over a batch, with exact gradients, for autograd and the compiler."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tether.functional._skew_exp_backward import skew_exp_backward
from tether.functional._traceable import traceable

__all__ = ["has_closed_form", "small_skew_exp"]

# Note [Closed forms of small skew exponentials]
#     n = 1: exp(A) for the 1 x 1 skew part A = i Im X (0 for real X), elementwise.
#     n = 2, real: A = [[0, -φ], [φ, 0]], exp(A) is the rotation by φ: cos and sin of φ, which
#     autograd differentiates exactly (no singular point).
#     n = 3, real (Rodrigues' formula): A = [a]ₓ, the cross-product matrix of a ∈ ℝ³, with
#     A² = a aᵀ - t I, t = θ² = |a|², so that
#         exp(A) = I + s₁ A + s₂ A² = cos θ I + s₁ A + s₂ a aᵀ,
#     s₁(t) = sin θ / θ, s₂(t) = (1 - cos θ) / θ² = ½ sinc²(θ/2), both entire in t.
#     n = 2, complex: A = i μ I + B, μ = Im tr(A) / 2, B traceless skew-Hermitian
#     [[i δ, -b̄], [b, -i δ]] with B² = -t I, t = δ² + |b|², so exp(A) = e^{iμ} (cos θ I + s₁ B).
#     A complex 3 x 3 skew-Hermitian matrix has three unrelated eigenvalues and no formula as
#     short: skew_matrix_exp takes another path for it.
#
#     The gradients are written out (Note [Gradients of the closed forms]) rather than left to
#     autograd, which would differentiate θ = √t at 0 (infinitely steep) and record some
#     thirty operations: the whole map is then a few passes over the batch, forward and
#     backward, which is what a batch of 65,536 kernels of 3 x 3 spends its time on.

# Note [Gradients of the closed forms]
#     With c(t) = cos θ (c' = -s₁/2), the cotangent G of Q = c I + s₁ A + s₂ a aᵀ gives
#         ā = s₁ v(G) + s₂ (G + Gᵀ) a + 2 a (c' tr G + s₁' ⟨G, A⟩ + s₂' aᵀ G a),
#     v(G) = (G₂₁ - G₁₂, G₀₂ - G₂₀, G₁₀ - G₀₁) the adjoint of a ↦ [a]ₓ, ⟨G, A⟩ = a · v(G); and
#     X̄ = [ā]ₓ / 2, since a = v(X) / 2. For complex n = 2, with H = e^{-iμ} G and the real
#     inner product Re⟨U, V⟩ = Re Σ Ūᵢⱼ Vᵢⱼ (autograd's convention for complex tensors):
#         μ̄ = Re⟨G, i Q⟩,   t̄ = c' Re tr H + s₁' Re⟨H, B⟩,
#         δ̄ = 2 δ t̄ + s₁ (Im H₀₀ - Im H₁₁),   b̄ = 2 t̄ b + s₁ (H₁₀ - H̄₀₁),
#     and X̄₀₀ = i (μ̄ + δ̄) / 2, X̄₁₁ = i (μ̄ - δ̄) / 2, X̄₁₀ = b̄ / 2, X̄₀₁ = -conj(b̄) / 2.
#     The slopes s₁' = (c - s₁) / 2t and s₂' = (s₁ - 2 s₂) / 2t cancel for small t (losing
#     about 6 eps / t and 24 eps / t): below t = _SERIES_BELOW they come from their series
#         s₁' = Σ_{m≥1} m (-1)ᵐ t^{m-1} / (2m + 1)!,   s₂' = Σ_{m≥1} m (-1)ᵐ t^{m-1} / (2m + 2)!,
#     whose terms alternate and shrink, _SERIES_TERMS of them reaching float64's eps at t = 4;
#     above it the quotients lose at most 6 eps. Forward mode is the same derivative applied
#     to a direction. Second derivatives are torch.linalg.matrix_exp's (Note [Derivatives of
#     skew_matrix_exp] in _skew_exp.py).

# Below this t = θ², the slopes s₁', s₂' come from their series.
_SERIES_BELOW = 4.0
# Terms of the series, per precision: the first term left out is below the dtype's eps
# times |s₂'| (> 1/60) for t ≤ 4.
_SERIES_TERMS = {"single": 8, "double": 14}

_NO_SECOND_DERIVATIVE = (
    "skew_matrix_exp() of a {n} x {n} matrix (a closed form) has no second derivative under "
    "this torch.func transform (its backward is first order; plain autograd with "
    "create_graph=True has them). Use skew_matrix_exp(..., algorithm='torch') or "
    "tether.functional.matrix_exp."
)


def has_closed_form(n: int, is_complex: bool) -> bool:
    """Whether :func:`small_skew_exp` has a closed form for ``n x n`` matrices."""
    return n <= 2 or (n == 3 and not is_complex)


def _coefficients(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``c = cos θ``, ``s₁ = sin θ / θ`` and ``s₂ = (1 - cos θ) / θ² = ½ (sin(θ/2) / (θ/2))²`` for
    ``t = θ²``: quotients without cancellation (torch.sinc is several times slower)."""
    theta = t.sqrt()
    zero = t == 0
    safe = torch.where(zero, 1.0, theta)
    s1 = torch.where(zero, 1.0, torch.sin(theta) / safe)
    half = torch.where(zero, 1.0, torch.sin(theta / 2) / (safe / 2))
    return torch.cos(theta), s1, half.square_().mul_(0.5)


def _slopes(t: Tensor, c: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """``s₁'(t)`` and ``s₂'(t)`` (Note [Gradients of the closed forms])."""
    # Σ_{m≥1} m (-1)ᵐ t^{m-1} / (2m + 1)! and / (2m + 2)!, by Horner's rule.
    d1, d2 = torch.zeros_like(t), torch.zeros_like(t)
    for m in reversed(range(1, _SERIES_TERMS[_precision(t.dtype)] + 1)):
        d1.mul_(t).add_(m * (-1) ** m / math.factorial(2 * m + 1))
        d2.mul_(t).add_(m * (-1) ** m / math.factorial(2 * m + 2))
    near = t < _SERIES_BELOW
    safe = torch.where(near, 1.0, t).mul_(2)
    return torch.where(near, d1, (c - s1) / safe), torch.where(near, d2, (s1 - 2 * s2) / safe)


def _precision(dtype: torch.dtype) -> str:
    return "double" if dtype == torch.float64 else "single"


def _entries(X: Tensor) -> list[Tensor]:
    """The ``n²`` entries of ``X`` of shape ``(*, n, n)``, row by row, each of shape ``(b,)``
    (the batch flattened: torch's loops over a (b, 9) tensor's columns are many times faster
    than over a (b₁, b₂, 9) tensor's)."""
    return list(X.reshape(math.prod(X.shape[:-2]), X.shape[-1] * X.shape[-2]).unbind(-1))


def _matrix(entries: list[Tensor], n: int) -> Tensor:
    """The ``(*, n, n)`` matrix of the ``n²`` entries, row by row, each of shape ``(*)``."""
    # reshape rather than unflatten, which the batching of gradcheck's legacy vmap lacks
    return torch.stack(entries, dim=-1).reshape(*entries[0].shape, n, n)


def _rotation(X: Tensor) -> Tensor:
    """``exp`` of the skew part of a real ``(*, 2, 2)`` ``X``: the rotation by ``φ``."""
    phi = (X[..., 1, 0] - X[..., 0, 1]) / 2
    c, s = torch.cos(phi), torch.sin(phi)
    return _matrix([c, -s, s, c], 2)


# Rodrigues' formula works on the nine entries of each matrix as separate (b,)-shaped tensors
# and writes its results into the columns of a (b, 9) tensor: reductions and stacks over a
# last dimension of 3, and transposes of 3 x 3 matrices, are several times slower in eager
# torch than the passes over the batch they replace.


def _rodrigues(X: Tensor) -> tuple[Tensor, Tensor]:
    """``Q = c I + s₁ [a]ₓ + s₂ a aᵀ`` for real ``(*, 3, 3)`` ``X``, and ``(a₁, a₂, a₃, c, s₁, s₂)``
    stacked, shape ``(6, b)`` (``b`` the size of the batch), for the backward."""
    x = _entries(X)
    saved = X.new_empty((6, x[0].shape[0]))
    a1, a2, a3, c, s1, s2 = saved.unbind(0)
    torch.sub(x[7], x[5], out=a1)
    torch.sub(x[2], x[6], out=a2)
    torch.sub(x[3], x[1], out=a3)
    saved[:3].mul_(0.5)
    t = (a1 * a1).addcmul_(a2, a2).addcmul_(a3, a3)
    for out, value in zip((c, s1, s2), _coefficients(t), strict=True):
        out.copy_(value)
    b1, b2, b3 = s2 * a1, s2 * a2, s2 * a3
    r1, r2, r3 = s1 * a1, s1 * a2, s1 * a3
    p12, p23, p13 = b1 * a2, b2 * a3, b1 * a3
    if torch.compiler.is_compiling():  # Dynamo rejects writes into columns; inductor fuses
        entries = [c + b1 * a1, p12 - r3, p13 + r2, p12 + r3, c + b2 * a2, p23 - r1]
        entries += [p13 - r2, p23 + r1, c + b3 * a3]
        return torch.stack(entries, dim=-1).reshape(X.shape), saved
    Q = X.new_empty((x[0].shape[0], 9))
    q = Q.unbind(-1)
    torch.addcmul(c, b1, a1, out=q[0])
    torch.addcmul(c, b2, a2, out=q[4])
    torch.addcmul(c, b3, a3, out=q[8])
    for (i, j), p, r in (((1, 3), p12, r3), ((5, 7), p23, r1), ((6, 2), p13, r2)):
        torch.sub(p, r, out=q[i])  # Q₀₁ = s₂ a₁ a₂ - s₁ a₃, ...
        torch.add(p, r, out=q[j])  # Q₁₀ = s₂ a₁ a₂ + s₁ a₃, ...
    return Q.reshape(X.shape), saved


def _rodrigues_gradient(G: Tensor, saved: Tensor) -> Tensor:
    """``X̄`` of Note [Gradients of the closed forms], real ``n = 3``, from the cotangent ``G``."""
    g = _entries(G)
    a1, a2, a3, c, s1, s2 = saved.unbind(0)
    t = a1 * a1 + a2 * a2 + a3 * a3
    d1, d2 = _slopes(t, c, s1, s2)
    v1, v2, v3 = g[7] - g[5], g[2] - g[6], g[3] - g[1]  # v(G)
    w01, w02, w12 = g[1] + g[3], g[2] + g[6], g[5] + g[7]  # G + Gᵀ off the diagonal
    # Out-of-place products (no addcmul_, which torch.func.vmap lacks a batching rule for):
    # under jacrev, G is batched.
    u1 = 2 * g[0] * a1 + w01 * a2 + w02 * a3  # u = (G + Gᵀ) a
    u2 = 2 * g[4] * a2 + w01 * a1 + w12 * a3
    u3 = 2 * g[8] * a3 + w02 * a1 + w12 * a2
    a_v = a1 * v1 + a2 * v2 + a3 * v3  # ⟨G, A⟩
    a_u = a1 * u1 + a2 * u2 + a3 * u3  # 2 aᵀ G a
    trace = g[0] + g[4] + g[8]
    t_bar = d1 * a_v + 0.5 * d2 * a_u - 0.5 * s1 * trace
    h1, h2, h3 = (
        (s1 * v + s2 * u + 2 * t_bar * a) * 0.5  # ā / 2
        for v, u, a in ((v1, u1, a1), (v2, u2, a2), (v3, u3, a3))
    )
    return _cross_entries(h1, h2, h3).reshape(G.shape)


def _cross_entries(h1: Tensor, h2: Tensor, h3: Tensor) -> Tensor:
    """``[h]ₓ``, shape ``(b, 9)``, from ``h₁, h₂, h₃`` of shape ``(b,)``."""
    if torch.compiler.is_compiling():  # no writes into columns under Dynamo
        zero = torch.zeros_like(h1)
        return torch.stack([zero, -h3, h2, h3, zero, -h1, -h2, h1, zero], dim=-1)
    try:
        M = h1.new_zeros((h1.shape[0], 9))
        m = M.unbind(-1)
        for (i, j), h in (((7, 5), h1), ((2, 6), h2), ((3, 1), h3)):
            m[i].copy_(h)
            torch.neg(h, out=m[j])
        return M
    except RuntimeError:  # batched under torch.func.vmap, which cannot write into M
        zero = torch.zeros_like(h1)
        return torch.stack([zero, -h3, h2, h3, zero, -h1, -h2, h1, zero], dim=-1)


def _axis(X: Tensor) -> Tensor:
    """``a`` with ``[a]ₓ = (X - Xᵀ) / 2``, shape ``(b, 3)`` (the batch flattened)."""
    x = _entries(X)
    return torch.stack([x[7] - x[5], x[2] - x[6], x[3] - x[1]], dim=-1).mul_(0.5)


def _cross(a: Tensor) -> Tensor:
    """``[a]ₓ``, shape ``(*, 3, 3)``, for ``a`` of shape ``(*, 3)``."""
    zero = torch.zeros_like(a[..., 0])
    a1, a2, a3 = a.unbind(-1)
    return _matrix([zero, -a3, a2, a3, zero, -a1, -a2, a1, zero], 3)


class _Rodrigues(torch.autograd.Function):
    """``exp((X - Xᵀ) / 2)`` for real ``(*, 3, 3)`` ``X``, and what its backward reads; Note
    [Closed forms of small skew exponentials]."""

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor]:
        return _rodrigues(X)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, saved = ctx.saved_tensors
        return skew_exp_backward(
            X, grad, lambda: _rodrigues_gradient(grad, saved), _NO_SECOND_DERIVATIVE.format(n=3)
        )

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor, None]:
        (X,) = ctx.saved_tensors
        a, a_dot = _axis(X), _axis(X_dot)
        t = (a * a).sum(-1)
        t_dot = 2 * (a * a_dot).sum(-1)
        c, s1, s2 = _coefficients(t)
        d1, d2 = _slopes(t, c, s1, s2)
        # d(c I + s₁ [a]ₓ + s₂ a aᵀ), with c' = -s₁ / 2
        outer = (d2 * t_dot).unsqueeze(-1) * a
        Q_dot = outer.unsqueeze(-1) * a.unsqueeze(-2)
        Q_dot.add_(_cross((d1 * t_dot).unsqueeze(-1) * a + s1.unsqueeze(-1) * a_dot))
        Q_dot.diagonal(dim1=-2, dim2=-1).add_((-0.5 * s1 * t_dot).unsqueeze(-1))
        mixed = (s2.unsqueeze(-1) * a_dot).unsqueeze(-1) * a.unsqueeze(-2)
        return Q_dot.add_(mixed).add_(mixed.mT).reshape(X.shape), None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None], X: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, int]]:
        # The forward batches over leading dimensions already (and writes into new tensors,
        # which a batched tensor cannot be).
        X = X.movedim(0 if in_dims[0] is None else in_dims[0], 0)
        if in_dims[0] is None:
            X = X.expand(info.batch_size, *X.shape)
        return _Rodrigues.apply(X), (0, 1)  # type: ignore[no-untyped-call]  # untyped in torch


def _unitary_parts(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``μ``, ``δ``, ``b`` and ``t`` of a complex ``(*, 2, 2)`` ``X`` (its skew-Hermitian part)."""
    first, second = X[..., 0, 0].imag, X[..., 1, 1].imag
    b = (X[..., 1, 0] - X[..., 0, 1].conj()) / 2
    mu, nu = (first + second) / 2, (first - second) / 2
    return mu, nu, b, nu * nu + (b.real * b.real + b.imag * b.imag)


def _traceless(nu: Tensor, b: Tensor) -> Tensor:
    """``B = [[i δ, -b̄], [b, -i δ]]``, shape ``(*, 2, 2)``."""
    i_nu = torch.complex(torch.zeros_like(nu), nu)
    return _matrix([i_nu, -b.conj(), b, -i_nu], 2)


def _phase(mu: Tensor) -> Tensor:
    """``e^{iμ}``, shape ``(*, 1, 1)`` to scale matrices."""
    return torch.polar(torch.ones_like(mu), mu)[..., None, None]


class _UnitaryTwo(torch.autograd.Function):
    """``exp((X - Xᴴ) / 2)`` for complex ``(*, 2, 2)`` ``X``; Note [Closed forms of small skew
    exponentials]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> Tensor:
        mu, nu, b, t = _unitary_parts(X)
        c, s1, _ = _coefficients(t)
        P = _traceless(nu * s1, b * s1)
        P.diagonal(dim1=-2, dim2=-1).add_(c.unsqueeze(-1))
        return P.mul_(_phase(mu))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        X, Q = ctx.saved_tensors
        return skew_exp_backward(
            X, grad, lambda: _unitary_gradient(X, Q, grad), _NO_SECOND_DERIVATIVE.format(n=2)
        )

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> Tensor:
        X, Q = ctx.saved_tensors
        mu, nu, b, t = _unitary_parts(X)
        mu_dot, nu_dot, b_dot, _ = _unitary_parts(X_dot)
        t_dot = 2 * (nu * nu_dot + (b.conj() * b_dot).real)
        c, s1, s2 = _coefficients(t)
        d1, _ = _slopes(t, c, s1, s2)
        P_dot = _traceless(d1 * t_dot * nu + s1 * nu_dot, d1 * t_dot * b + s1 * b_dot)
        P_dot.diagonal(dim1=-2, dim2=-1).add_((-0.5 * s1 * t_dot).unsqueeze(-1))
        i_mu_dot = torch.complex(torch.zeros_like(mu_dot), mu_dot)[..., None, None]
        return P_dot.mul_(_phase(mu)).add_(i_mu_dot * Q)


def _unitary_gradient(X: Tensor, Q: Tensor, G: Tensor) -> Tensor:
    """``X̄`` of Note [Gradients of the closed forms], complex ``n = 2``."""
    mu, nu, b, t = _unitary_parts(X)
    c, s1, s2 = _coefficients(t)
    d1, _ = _slopes(t, c, s1, s2)
    mu_bar = (G.conj() * Q).imag.sum((-2, -1)).neg_()  # Re⟨G, iQ⟩
    H = G * _phase(-mu)
    B = _traceless(nu, b)
    trace = H.diagonal(dim1=-2, dim2=-1).sum(-1).real
    t_bar = -0.5 * s1 * trace + d1 * (H.conj() * B).real.sum((-2, -1))
    nu_bar = 2 * nu * t_bar + s1 * (H[..., 0, 0].imag - H[..., 1, 1].imag)
    b_bar = 2 * t_bar * b + s1 * (H[..., 1, 0] - H[..., 0, 1].conj())
    zero = torch.zeros_like(mu_bar)
    diagonal = [
        torch.complex(zero, (mu_bar + nu_bar) / 2),
        torch.complex(zero, (mu_bar - nu_bar) / 2),
    ]
    return _matrix([diagonal[0], -b_bar.conj() / 2, b_bar / 2, diagonal[1]], 2)


_RodriguesTraceable = traceable(_Rodrigues)
_UnitaryTwoTraceable = traceable(_UnitaryTwo)


def small_skew_exp(X: Tensor) -> Tensor:
    """``exp((X - Xᴴ) / 2)`` for ``X`` of shape ``(*, n, n)`` with a closed form
    (:func:`has_closed_form`); Note [Closed forms of small skew exponentials].

    Example:
        >>> import torch
        >>> X = torch.randn(5, 3, 3, dtype=torch.float64)
        >>> torch.allclose(small_skew_exp(X), torch.linalg.matrix_exp((X - X.mT) / 2))
        True
    """
    n = X.shape[-1]
    if n == 1:
        return torch.exp((X - X.mH) / 2)
    if n == 2 and not X.is_complex():
        return _rotation(X)
    compiling = torch.compiler.is_compiling()
    if n == 2:
        function = _UnitaryTwoTraceable if compiling else _UnitaryTwo
        return function.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    function = _RodriguesTraceable if compiling else _Rodrigues
    Q, _ = function.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q
