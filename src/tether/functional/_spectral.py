"""Spectral maps ``A = Q diag(λ) Qᴴ ↦ Q diag(f(λ)) Qᴴ`` of symmetric (Hermitian) matrices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tether.functional._first_order import first_order
from tether.functional._traceable import traceable

__all__ = ["Spectral", "rebuild", "spectral"]

Spectral = Callable[[Tensor], Tensor]

# Note [Gradients of spectral functions]
#     A spectral map A = Q diag(λ) Qᴴ ↦ Q diag(f(λ)) Qᴴ is smooth whenever f is, but the
#     backward of torch.linalg.eigh divides by λᵢ - λⱼ and returns NaN as soon as two
#     eigenvalues coincide, which happens at the most common starting points (the identity,
#     a multiple of it, any matrix set from a diagonal one). We differentiate the map as a
#     whole instead, with the Daleckii-Krein formula: for a symmetric direction H,
#         d f(A)[H] = Q (Γ ∘ (Qᴴ H Q)) Qᴴ,   Γᵢⱼ = (f(λᵢ) - f(λⱼ)) / (λᵢ - λⱼ),
#     with Γᵢⱼ = f'(λᵢ) when λᵢ = λⱼ. The map is self-adjoint, so the same formula gives the
#     backward and the forward-mode derivative: four matrix products, against the 2n x 2n
#     block exponential of torch.linalg.matrix_exp's backward (ten times slower at n = 1024).
#     When f(λᵢ) and f(λⱼ) agree to a relative cbrt(eps) the quotient loses digits to
#     cancellation, and f' at the midpoint is used instead: both errors are then of order
#     eps^(2/3).
#     The formula is first order. When autograd records the backward (create_graph=True, or
#     torch.func.grad, which always asks for a graph) and the map has a differentiable
#     reference implementation (torch.linalg.matrix_exp for f = exp), the gradient is
#     recomputed through it: exact second derivatives, at PyTorch's cost, only when asked
#     for. Otherwise the gradient goes through first_order, so that a second derivative
#     raises an error instead of silently missing this map's curvature.


def rebuild(Q: Tensor, L: Tensor) -> Tensor:
    """``Q diag(L) Qᴴ``, made exactly symmetric (Hermitian)."""
    Y = (Q * L.unsqueeze(-2).to(Q.dtype)) @ Q.mH
    return (Y + Y.mH) / 2


def _divided_differences(L: Tensor, f: Spectral, df: Spectral) -> Tensor:
    """The matrix Γ of Note [Gradients of spectral functions] for eigenvalues ``L``."""
    fL = f(L)
    fi, fj = fL.unsqueeze(-1), fL.unsqueeze(-2)
    Li, Lj = L.unsqueeze(-1), L.unsqueeze(-2)
    rtol = torch.finfo(L.dtype).eps ** (1 / 3)
    close = (fi - fj).abs() <= rtol * torch.maximum(fi.abs(), fj.abs())
    step = torch.where(close, torch.ones_like(Li - Lj), Li - Lj)
    return torch.where(close, df((Li + Lj) / 2), (fi - fj) / step)


def _derivative(L: Tensor, Q: Tensor, H: Tensor, f: Spectral, df: Spectral) -> Tensor:
    """The Daleckii-Krein derivative of the map at ``Q diag(L) Qᴴ`` in the direction ``H``."""
    gamma = _divided_differences(L, f, df).to(Q.dtype)
    return Q @ (gamma * (Q.mH @ H @ Q)) @ Q.mH


class _SpectralMap(torch.autograd.Function):
    """``A ↦ Q diag(f(λ)) Qᴴ`` for a symmetric ``A``; see Note [Gradients of spectral ...]."""

    @staticmethod
    def forward(
        A: Tensor, f: Spectral, df: Spectral, reference: Spectral | None, message: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        L, Q = torch.linalg.eigh(A)
        return rebuild(Q, f(L)), L, Q

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        A, ctx.f, ctx.df, ctx.reference, ctx.message = inputs
        _, L, Q = output
        ctx.mark_non_differentiable(L, Q)
        ctx.set_materialize_grads(False)  # no zero gradients for L and Q
        ctx.save_for_backward(A, L, Q)
        ctx.save_for_forward(L, Q)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None, None, None
        A, L, Q = ctx.saved_tensors
        if torch.is_grad_enabled() and ctx.reference is not None:
            with torch.enable_grad():
                Y = ctx.reference(A)
            if Y.requires_grad:
                (A_bar,) = torch.autograd.grad(Y, A, grad, create_graph=True, allow_unused=True)
                if A_bar is not None:  # None under some nested torch.func transforms
                    return A_bar, None, None, None, None
        with torch.no_grad():
            A_bar = _derivative(L, Q, grad, ctx.f, ctx.df)
        if torch.is_grad_enabled():
            A_bar = first_order(A_bar, ctx.message, A, grad)
        return A_bar, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, A_dot: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        L, Q = ctx.saved_tensors
        Y_dot = first_order(_derivative(L, Q, A_dot, ctx.f, ctx.df), ctx.message, A_dot)
        return Y_dot, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], A: Tensor, *args: Any
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        # forward batches over leading dimensions already.
        batch_dim = 0 if in_dims[0] is None else in_dims[0]
        outputs = _SpectralMap.apply(A.movedim(batch_dim, 0), *args)  # type: ignore[no-untyped-call]  # untyped in torch
        return outputs, (0, 0, 0)


_SpectralMapTraceable = traceable(_SpectralMap)


def spectral(
    A: Tensor, f: Spectral, df: Spectral, *, reference: Spectral | None = None, name: str
) -> Tensor:
    """``f`` applied to the eigenvalues of a symmetric (Hermitian) ``A``, with derivative ``df``.

    ``reference`` is a differentiable implementation of the same map, used for second
    derivatives (Note [Gradients of spectral functions]); ``name`` names the public function
    in the error raised where a second derivative is not available.
    """
    message = (
        f"{name}() has no second derivative here: its gradient is a first-order formula "
        "(exact second derivatives exist for spd_exp under plain autograd with "
        "create_graph=True)."
    )
    function = _SpectralMapTraceable if torch.compiler.is_compiling() else _SpectralMap
    Y, _, _ = function.apply(A, f, df, reference, message)  # type: ignore[no-untyped-call]  # untyped in torch
    return Y
