"""``base @ householder(X)`` for many 2 x 2 or 3 x 3 matrices: the reflectors applied to the
base from the right, in entries."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tether.functional._householder import householder
from tether.functional._householder_small import _householder_small_autograd
from tether.functional._small_matrices import (
    SMALL_BATCH,
    _entries,
    _matrix,
    _reduce,
    _rows,
    _rows_into,
    _vmap_rule,
    base_rows,
    transposed_product_axis,
)
from tether.functional._traceable import traceable

__all__ = ["base_householder"]

# Note [Householder reflectors after a base point]
#     The orthogonal constraint computes W = base Q, Q = H₁ ⋯ Hₙ D for a square X (D the
#     signs of the diagonal). For a batch of matrices of 2 x 2 or 3 x 3 (convolution
#     kernels), _BaseHouseholder applies the reflectors to the base from the right,
#     Bᵢ = Bᵢ₋₁ Hᵢ = Bᵢ₋₁ - τ (Bᵢ₋₁ y) yᵀ from B₀ = base, in entries (each a vector over the
#     batch, as in Note [The Cayley map of a lower triangle, with its base point] in
#     _lower_cayley.py): the last reflector (y = eₙ, τ = 2) only negates the last column, and
#     D scales columns, so that W = Bₙ₋₁ D' with D' = D diag(1, ..., 1, -1). The backward
#     walks back from B̄ₙ₋₁ = W̄ D' with the forward's Bᵢ recomputed from the base: for
#     Bᵢ = Bᵢ₋₁ - τ p yᵀ, p = Bᵢ₋₁ y and g = B̄ᵢ y, ȳ = -τ (Bᵢ₋₁ᵀ g + B̄ᵢᵀ p), τ̄ = -pᵀ g
#     (reaching the reflector's vector v as τ² (pᵀ g) v, from τ = 2/(1 + |v|²)) and
#     B̄ᵢ₋₁ = B̄ᵢ - τ g yᵀ. The product with the base costs no batched matrix product (slow on
#     tiny matrices) either way.
#
#     For n = 3 the backward needs neither the base nor the Bᵢ. Q is orthogonal, so
#     dW = W (Qᵀ dQ) and ⟨W̄, dW⟩ = k · ω with Qᵀ dQ = [ω]ₓ and k = v(Wᵀ W̄) (see
#     transposed_product_axis). Each Hᵢ dHᵢ is skew: with n̂ = y/|y|, H = I - 2 n̂ n̂ᵀ and
#     H dH = 2 (n̂ dn̂ᵀ - dn̂ n̂ᵀ) = [z]ₓ, z = 2 [dn̂]ₓ n̂. From Q = H₀ H₁ D',
#         Qᵀ dQ = D' H₁ (H₀ dH₀) H₁ D' + D' (H₁ dH₁) D',
#     and R [z]ₓ Rᵀ = det(R) [R z]ₓ for orthogonal R, ω = det(D') D' (z₁ - H₁ z₀). With
#     m = det(D') D' k, k · ω = m · z₁ - (H₁ m) · z₀, and c · z = 2 dn̂ · [n̂]ₓ c gives
#         ȳᵢ = τᵢ [yᵢ]ₓ cᵢ,  c₁ = m,  c₀ = -H₁ m,
#     (the gradient in n̂ is orthogonal to n̂, and dn̂ = (I - n̂ n̂ᵀ) dy / |y|, τ = 2/|y|²),
#     whose entries below the diagonal are X̄'s. About 40 operations on vectors where the
#     walk back takes 150; the forward keeps W's entries in rows and reads the base's rows
#     kept between calls (Note [The entries of a base point, kept] in _small_matrices.py).


def _reflector_entries(x: list[Tensor], n: int) -> list[tuple[list[Tensor], Tensor]]:
    """``v`` (the entries below the diagonal) and ``τ`` of the reflectors ``1 .. n-1`` of a
    square ``X`` from its entries."""
    out = []
    for i in range(n - 1):
        v = [x[r * n + i] for r in range(i + 1, n)]
        norm = v[0] * v[0]
        for entry in v[1:]:
            norm.addcmul_(entry, entry)
        out.append((v, norm.add_(1.0).reciprocal_().mul_(2.0)))
    return out


def _reflect_rows(B: list[Tensor], n: int, i: int, v: list[Tensor], tau: Tensor) -> list[Tensor]:
    """The entries of ``B H`` for ``H = I - τ y yᵀ``, ``y = eᵢ + v`` (``v`` below ``i``)."""
    out = list(B)
    for r in range(n):
        row = B[r * n : (r + 1) * n]
        p = row[i].clone()
        for k, entry in enumerate(v, start=i + 1):
            p.addcmul_(row[k], entry)
        p.mul_(tau)
        out[r * n + i] = row[i] - p
        for k, entry in enumerate(v, start=i + 1):
            out[r * n + k] = torch.addcmul(row[k], p, entry, value=-1.0)
    return out


def _column_scales(x: list[Tensor], n: int) -> list[Tensor]:
    """``D'``: the signs of the diagonal, the last negated."""
    scales = [torch.where(x[j * n + j] < 0, -1.0, 1.0).to(x[0].dtype) for j in range(n)]
    scales[-1].neg_()
    return scales


def _gradient_3(X: Tensor, W_rows: Tensor, grad: Tensor) -> list[Tensor | None]:
    """The entries of ``X̄`` for n = 3 from ``v(Wᵀ W̄)`` (Note [Householder reflectors after a
    base point]); ``None`` for zero."""
    x = _entries(X)
    g = _rows_into(grad.new_empty(9, W_rows.shape[-1]), grad)
    k = transposed_product_axis(W_rows.unbind(0), g)
    d = _column_scales(x, 3)
    m = [k[0].mul_(d[1]).mul_(d[2]), k[1].mul_(d[0]).mul_(d[2]), k[2].mul_(d[0]).mul_(d[1])]
    (y0, tau0), (y1, tau1) = _reflector_entries(x, 3)
    a, b = y0
    (v,) = y1
    # c₀ = -H₁ m = τ₁ (m₁ + v m₂) y₁ - m, y₁ = (0, 1, v)
    y1_m = torch.addcmul(m[1], v, m[2]).mul_(tau1)
    c1 = y1_m - m[1]
    c2 = torch.addcmul(m[2], y1_m, v, value=-1.0).neg_()
    # X̄ below the diagonal: ȳ₀ = τ₀ [y₀]ₓ c₀ with y₀ = (1, a, b) and c₀ = (-m₀, c1, c2),
    # ȳ₁ = τ₁ [y₁]ₓ m
    x10 = (b * m[0]).add_(c2).mul_(tau0).neg_()
    x20 = torch.addcmul(c1, a, m[0]).mul_(tau0)
    x21 = (m[0] * tau1).neg_()
    return [None, None, None, x10, None, None, x20, x21, None]


class _BaseHouseholder(torch.autograd.Function):
    """``base @ householder(X)`` for many square ``X`` of 2 x 2 or 3 x 3; Note [Householder
    reflectors after a base point]. The second output keeps the base's entries (n = 2) or
    W's (n = 3), in rows."""

    @staticmethod
    def forward(X: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
        n = X.shape[-1]
        x = _entries(X)
        # n = 2 keeps the base's rows for its backward, n = 3 the entries of W.
        saved = _rows(base.expand_as(X)) if n == 2 else X.new_empty(9, math.prod(X.shape[:-2]))
        B = list((saved if n == 2 else base_rows(base, X)).unbind(0))
        for i, (v, tau) in enumerate(_reflector_entries(x, n)):
            B = _reflect_rows(B, n, i, v, tau)
        scales = _column_scales(x, n)
        if n == 2 or torch.compiler.is_compiling():  # Dynamo rejects writes into rows
            W = [entry * scales[k % n] for k, entry in enumerate(B)]
            if n == 3:
                saved = torch.stack(W)
            return _matrix(W, X), saved
        rows = saved.unbind(0)
        for k, entry in enumerate(B):
            torch.mul(entry, scales[k % n], out=rows[k])
        return _matrix(rows, X), saved

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, int | None], X: Tensor, base: Tensor) -> Any:
        return _vmap_rule(_BaseHouseholder, info, in_dims, X, base)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        X, base, rows = ctx.saved_tensors  # the base's (n = 2) or W's (n = 3) entries
        if torch.is_grad_enabled():  # a gradient to be differentiated again
            return torch.func.vjp(_base_householder_autograd, X, base)[1](grad)
        n = X.shape[-1]
        if n == 3:
            base_bar = None
            if ctx.needs_input_grad[1]:
                base_bar = _reduce(grad @ householder(X).mT, base)
            return _matrix(_gradient_3(X, rows, grad), X), base_bar
        x = _entries(X)
        reflectors = _reflector_entries(x, n)
        Bs = [list(rows.unbind(0))]  # B₀ .. Bₙ₋₂, the inputs of the reflectors
        for i, (v, tau) in enumerate(reflectors[:-1]):
            Bs.append(_reflect_rows(Bs[-1], n, i, v, tau))
        scales = _column_scales(x, n)
        B_bar = [entry * scales[k % n] for k, entry in enumerate(_entries(grad))]
        X_bar: list[Tensor | None] = [None] * (n * n)
        for i in reversed(range(n - 1)):
            v, tau = reflectors[i]
            B = Bs[i]
            p, g = [], []
            for r in range(n):
                pr, gr = B[r * n + i].clone(), B_bar[r * n + i].clone()
                for k, entry in enumerate(v, start=i + 1):
                    pr.addcmul_(B[r * n + k], entry)
                    gr.addcmul_(B_bar[r * n + k], entry)
                p.append(pr)
                g.append(gr)
            pg = p[0] * g[0]
            for r in range(1, n):
                pg.addcmul_(p[r], g[r])
            tau_square = tau * tau
            for k, entry in enumerate(v, start=i + 1):
                # v̄ₖ = ȳₖ + τ² (pᵀ g) vₖ, ȳₖ = -τ Σᵣ (Bᵣₖ gᵣ + B̄ᵣₖ pᵣ)
                y_bar = B[k] * g[0]
                y_bar.addcmul_(B_bar[k], p[0])
                for r in range(1, n):
                    y_bar.addcmul_(B[r * n + k], g[r]).addcmul_(B_bar[r * n + k], p[r])
                X_bar[k * n + i] = (pg * entry).mul_(tau_square).addcmul_(y_bar, tau, value=-1.0)
            for r in range(n):
                tg = g[r] * tau
                B_bar[r * n + i] = B_bar[r * n + i] - tg
                for k, entry in enumerate(v, start=i + 1):
                    B_bar[r * n + k] = torch.addcmul(B_bar[r * n + k], tg, entry, value=-1.0)
        base_bar = None
        if ctx.needs_input_grad[1]:
            base_bar = _reduce(_matrix(B_bar, X), base)
        return _matrix(X_bar, X), base_bar

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor | None, base_dot: Tensor | None) -> tuple[Tensor, None]:
        X, base = ctx.saved_tensors
        W_dot = torch.zeros_like(X)
        if X_dot is not None:
            W_dot = W_dot + base @ _householder_small_autograd(X, X_dot)
        if base_dot is not None:
            W_dot = W_dot + base_dot @ _householder_small_autograd(X)
        return W_dot, None


_BaseHouseholderTraceable = traceable(_BaseHouseholder)


def _base_householder_autograd(X: Tensor, base: Tensor) -> Tensor:
    return base @ householder(X)


def base_householder(X: Tensor, base: Tensor) -> Tensor:
    """``base @ householder(X)`` for square ``(*, n, n)`` ``X`` and ``base``; many matrices of
    2 x 2 or 3 x 3 by Note [Householder reflectors after a base point].

    Example:
        >>> X, base = torch.randn(40, 3, 3), torch.randn(40, 3, 3)
        >>> torch.allclose(base_householder(X, base), base @ householder(X), atol=1e-6)
        True
    """
    n = X.shape[-1]
    if X.shape[-2] != n or n not in (2, 3) or math.prod(X.shape[:-2]) < SMALL_BATCH:
        return base @ householder(X)
    # (the "loop" path of householder_path, with the base inside)
    function: Any = _BaseHouseholderTraceable if torch.compiler.is_compiling() else _BaseHouseholder
    W, _ = function.apply(X, base)
    return W
