"""The orthogonal constraints' exponential map on batches of real 2 x 2 and 3 x 3 matrices,
``base @ exp(tril(X) - tril(X)ᵀ)`` in one autograd Function: rotations by their angle and
Rodrigues' formula, with the gradient taken from ``Wᵀ W̄``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tether.functional._lower_cayley import rotation_product
from tether.functional._skew_exp_small import (
    _SERIES_BELOW,
    _SERIES_TERMS,
    _coefficients,
    _precision,
)
from tether.functional._small_matrices import (
    SMALL_BATCH,
    _entries,
    _matmul_into,
    _matrix,
    _reduce,
    _rows_into,
    _vmap_rule,
    angle_gradient,
    composite_vjp,
    transposed_product_axis,
)
from tether.functional._traceable import traceable

__all__ = ["lower_exp", "takes_lower_exp"]


# Note [The exponential map of a lower triangle, with its base point]
#     The orthogonal constraints' default map is W = base exp(A), A = L - Lᵀ, L = tril(X).
#     For batches of real 2 x 2 and 3 x 3 matrices (convolution kernels) it is one Function,
#     built as the Cayley map's (Note [The Cayley map of a lower triangle, with its base
#     point] in _lower_cayley.py): entries as vectors over the batch, the product with the
#     base's kept rows, and a backward from Wᵀ W̄ that needs neither the base nor tril, with
#     the exponential's derivative in place of the Cayley map's:
#         n = 2:  exp(A) is the rotation by φ = X₁₀; Qᵀ dQ = J dφ, so X̄₁₀ = ⟨W̄, W J⟩.
#         n = 3:  with a = (X₂₁, -X₂₀, X₁₀), exp(A) = c I + s₁ [a]ₓ + s₂ a aᵀ (Note [Closed
#                 forms of small skew exponentials] in _skew_exp_small.py) and
#                 Qᵀ dQ = [J(a) da]ₓ, J(a) = I - s₂ [a]ₓ + s₃ [a]ₓ², s₃ = (1 - s₁)/t, the
#                 right Jacobian of the exponential of SO(3), so that with k = v(Wᵀ W̄)
#                 (transposed_product_axis), ā = J(a)ᵀ k = k + s₂ [a]ₓ k + s₃ (a (a·k) - t k).
#     s₃ = Σₘ (-1)ᵐ tᵐ / (2m + 3)! cancels for small t: below t = _SERIES_BELOW it comes
#     from that series (_SERIES_TERMS terms), above from the quotient. Three passes of
#     autograd (tril, the exponential and the product) become one, and the backward about
#     40 operations on vectors. Second derivatives differentiate _lower_exp_autograd.


def takes_lower_exp(X: Tensor) -> bool:
    """Whether :func:`lower_exp` has a closed form for ``X``: a batch of at least SMALL_BATCH
    real square matrices of 2 x 2 or 3 x 3 (fewer take the general path, as cheap)."""
    n = X.shape[-1]
    return (
        X.shape[-2] == n
        and n in (2, 3)
        and not X.is_complex()
        and math.prod(X.shape[:-2]) >= SMALL_BATCH
    )


def _lower_exp_autograd(X: Tensor, base: Tensor | None) -> Tensor:
    """:func:`lower_exp` by autograd (for second derivatives)."""
    L = X.tril()
    Q = torch.linalg.matrix_exp(L - L.mT)
    return Q if base is None else base @ Q


def _third(t: Tensor, s1: Tensor) -> Tensor:
    """``s₃ = (1 - s₁)/t`` (Note [The exponential map of a lower triangle, with its base
    point]), from its series for small ``t``."""
    series = torch.zeros_like(t)
    for m in reversed(range(_SERIES_TERMS[_precision(t.dtype)] + 1)):
        series.mul_(t).add_((-1) ** m / math.factorial(2 * m + 3))
    near = t < _SERIES_BELOW
    return torch.where(near, series, (1.0 - s1) / torch.where(near, 1.0, t))


def _rodrigues_entries(X: Tensor, saved: Tensor) -> list[Tensor]:
    """The entries of ``exp(A)`` for real ``n = 3``, with ``a``, ``c``, ``s₁``, ``s₂`` written
    into the first six rows of ``saved``."""
    x = _entries(X)
    a1, a2, a3, c, s1, s2 = saved[:6].unbind(0)
    a1.copy_(x[7])
    torch.neg(x[6], out=a2)
    a3.copy_(x[3])
    t = (a1 * a1).addcmul_(a2, a2).addcmul_(a3, a3)
    for out, value in zip((c, s1, s2), _coefficients(t), strict=True):
        out.copy_(value)
    b1, b2, b3 = s2 * a1, s2 * a2, s2 * a3
    r1, r2, r3 = s1 * a1, s1 * a2, s1 * a3
    p12, p13, p23 = b1 * a2, b1 * a3, b2 * a3
    return [
        torch.addcmul(c, b1, a1),
        p12 - r3,
        p13 + r2,
        p12 + r3,
        torch.addcmul(c, b2, a2),
        p23 - r1,
        p13 - r2,
        p23 + r1,
        torch.addcmul(c, b3, a3),
    ]


def _rodrigues_gradient(grad: Tensor, saved: Tensor) -> list[Tensor | None]:
    """The entries of ``X̄`` for ``n = 3`` (``None`` for zero)."""
    a1, a2, a3, _, s1, s2 = saved[:6].unbind(0)
    g = _rows_into(grad.new_empty(9, a1.shape[0]), grad)
    k1, k2, k3 = transposed_product_axis(saved[6:].unbind(0), g)
    t = (a1 * a1).addcmul_(a2, a2).addcmul_(a3, a3)
    s3 = _third(t, s1)
    a_k = (a1 * k1).addcmul_(a2, k2).addcmul_(a3, k3)
    crossed = (  # [a]ₓ k
        (a2 * k3).addcmul_(a3, k2, value=-1.0),
        (a3 * k1).addcmul_(a1, k3, value=-1.0),
        (a1 * k2).addcmul_(a2, k1, value=-1.0),
    )
    a_bar = [
        torch.addcmul(k, s2, x).addcmul_(s3, (a * a_k).addcmul_(t, k, value=-1.0))
        for k, x, a in zip((k1, k2, k3), crossed, (a1, a2, a3), strict=True)
    ]
    return [None, None, None, a_bar[2], None, None, a_bar[1].neg_(), a_bar[0], None]


def _exponential(X: Tensor) -> Tensor:
    """``exp(tril(X) - tril(X)ᵀ)`` as matrices."""
    L = X.tril()
    return torch.linalg.matrix_exp(L - L.mT)


class _LowerExp(torch.autograd.Function):
    """``base · exp(tril(X) - tril(X)ᵀ)`` for batches of real ``n = 2, 3``; Note [The
    exponential map of a lower triangle, with its base point]. The second output keeps
    ``φ`` (n = 2), or ``a``, ``c``, ``s₁``, ``s₂`` and W's entries (n = 3)."""

    @staticmethod
    def forward(X: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        n, size = X.shape[-1], math.prod(X.shape[:-2])
        if n == 3:
            saved = X.new_empty(15, size)
            Q = _rodrigues_entries(X, saved)
            return rotation_product(X, base, Q, saved[6:]), saved
        saved = X.new_empty(1, size)
        phi = saved[0].copy_(_entries(X)[2])
        c, s = torch.cos(phi), torch.sin(phi)
        Q = [c, -s, s, c]
        if base is None:
            return _matrix(Q, X), saved
        return _matmul_into(torch.empty_like(X), _entries(base.expand_as(X)), Q, n), saved

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], X: Tensor, base: Tensor | None
    ) -> Any:
        return _vmap_rule(_LowerExp, info, in_dims, X, base)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        W, saved = output
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], W, saved)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        X, base, W, saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # a gradient to be differentiated again
            return composite_vjp(_lower_exp_autograd, X, base, grad)
        if X.shape[-1] == 3:
            X_bar = _matrix(_rodrigues_gradient(grad, saved), X)
        else:
            X_bar = _matrix([None, None, angle_gradient(grad, W), None], X)
        base_bar = None
        if base is not None and ctx.needs_input_grad[1]:
            base_bar = _reduce(grad @ _exponential(X).mT, base)
        return X_bar, base_bar

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor | None, base_dot: Tensor | None) -> tuple[Tensor, None]:
        X, base = ctx.saved_tensors
        Q = _exponential(X)
        W = Q if base is None else base @ Q
        W_dot = torch.zeros_like(W)
        if X_dot is not None:
            # dW = W (Qᵀ dQ), Qᵀ dQ = [J(a) ȧ]ₓ (J dφ for n = 2)
            L, L_dot = X.tril(), X_dot.tril()
            A, A_dot = L - L.mT, L_dot - L_dot.mT
            if X.shape[-1] == 2:
                W_dot = W_dot + W @ A_dot
            else:
                a = torch.stack([A[..., 2, 1], A[..., 0, 2], A[..., 1, 0]], dim=-1)
                t = (a * a).sum(-1)
                _, s1, s2 = _coefficients(t)
                s3 = _third(t, s1)
                # J(a) ȧ = ȧ - s₂ [a]ₓ ȧ + s₃ [a]ₓ² ȧ, as matrices: [[a]ₓ, Ȧ] = [[a]ₓ ȧ]ₓ
                AA_dot = A @ A_dot - A_dot @ A
                second = A @ AA_dot - AA_dot @ A
                omega = A_dot - s2[..., None, None] * AA_dot + s3[..., None, None] * second
                W_dot = W_dot + W @ omega
        if base_dot is not None:
            W_dot = W_dot + base_dot @ Q
        return W_dot, None


_LowerExpTraceable = traceable(_LowerExp)


def lower_exp(X: Tensor, base: Tensor | None = None) -> Tensor:
    """``base @ exp(L - Lᵀ)`` with ``L = tril(X)`` for batches of real ``(*, n, n)`` ``X``,
    ``n = 2`` or ``3`` (:func:`takes_lower_exp`), and ``base`` of the same shape (``exp(L -
    Lᵀ)`` without it): the orthogonal constraints' default map on convolution kernels, in
    one autograd Function (Note [The exponential map of a lower triangle, with its base
    point]). The gradient is exact, second derivatives and forward-mode AD work, and
    nothing synchronises with the device.

    Example:
        >>> X = torch.randn(40, 3, 3, dtype=torch.float64)
        >>> L = X.tril()
        >>> torch.allclose(lower_exp(X), torch.linalg.matrix_exp(L - L.mT))
        True
    """
    function: Any = _LowerExpTraceable if torch.compiler.is_compiling() else _LowerExp
    W, _ = function.apply(X, base)
    return W
