"""The Householder map on many small matrices: the reflectors one at a time, batch-last,
with a hand-written backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tether.functional._small_matrices import SMALL_SIZE, batch_first, batch_last, batch_last_view
from tether.functional._traceable import traceable

# Note [Householder reflectors one at a time]
#     For a batch of many matrices with few columns, _SmallHouseholder applies the reflectors
#     to E (the first k columns of I) one at a time, last first, in the batch-last layout
#     (Note [Batches of small matrices] in _small_matrices.py): Qᵢ = Hᵢ Qᵢ₊₁ = Qᵢ₊₁ - τ y uᵀ
#     with u = yᵀ Qᵢ₊₁, Q₀ the result (before the signs). Its backward walks the other way
#     and recomputes Qᵢ₊₁ = Hᵢ Qᵢ (a reflector is its own inverse, and orthogonal, so no
#     error grows) instead of storing every Qᵢ: with Ḡ the cotangent of Qᵢ and g = Ḡᵀ y, the
#     reflector's vector gets ȳ = -τ (Ḡ u + Qᵢ₊₁ g), its τ = 2 / (1 + ‖v‖²) gets τ̄ = -yᵀ Ḡ u
#     (which reaches v as -τ² τ̄ v), and Qᵢ₊₁ gets Hᵢ Ḡ = Ḡ - τ y gᵀ. Each step is a few
#     multiply-adds in place, where autograd's record of the same loop allocates several
#     times as much (on a CPU, fresh memory costs page faults that take longer than the
#     arithmetic on it). Second derivatives and forward mode differentiate
#     _householder_small_autograd instead.


def _strictly_lower(n: int, k: int, like: Tensor) -> Tensor:
    """The mask of the strictly lower triangle of batch-last ``(n, k, B)`` matrices."""
    return torch.ones(n, k, dtype=like.dtype, device=like.device).tril(-1).unsqueeze(-1)


def _small_reflectors(Xb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``V`` (strict lower trapezoid), ``τ`` and the signs of a batch-last ``(n, k, B)`` ``X``.

    The reflector ``i`` is ``I - τᵢ y yᵀ`` with ``y = V[:, i] + eᵢ``.
    """
    V = Xb * _strictly_lower(Xb.shape[0], Xb.shape[1], Xb)
    tau = 2.0 / (1.0 + (V * V).sum(dim=0))
    signs = (Xb.diagonal(dim1=0, dim2=1).mT < 0).to(Xb.dtype).mul_(-2.0).add_(1.0)
    return V, tau, signs


def _householder_small_autograd(X: Tensor, X_dot: Tensor | None = None) -> Tensor:
    """_SmallHouseholder's value, or with ``X_dot`` its derivative, recorded by autograd.

    For second derivatives and forward mode (Note [Householder reflectors one at a time]):
    ``Q̇ᵢ = Q̇ᵢ₊₁ - (τ̇ y + τ ẏ) uᵀ - τ y u̇ᵀ`` with ``u̇ = ẏᵀ Qᵢ₊₁ + yᵀ Q̇ᵢ₊₁``, in
    differentiable operations, so that nested transforms can differentiate it again.
    """
    n, k = X.shape[-2], X.shape[-1]
    Xb = batch_last(X)
    V, tau, signs = _small_reflectors(Xb)
    eye = torch.eye(n, k, dtype=X.dtype, device=X.device).unsqueeze(-1)
    Y = V + eye
    Q = eye.expand_as(Xb)
    if X_dot is None:
        for i in reversed(range(k)):
            y = Y[:, i : i + 1]
            Q = Q - (tau[i] * y) * (y * Q).sum(dim=0, keepdim=True)
        return batch_first(Q * signs, tuple(X.shape[:-2])).contiguous()
    V_dot = batch_last(X_dot) * _strictly_lower(n, k, X)
    tau_dot = -tau * tau * (V * V_dot).sum(dim=0)
    Q_dot = torch.zeros_like(Xb)
    for i in reversed(range(k)):
        y, y_dot, t, t_dot = Y[:, i : i + 1], V_dot[:, i : i + 1], tau[i], tau_dot[i]
        u = (y * Q).sum(dim=0, keepdim=True)
        u_dot = (y_dot * Q + y * Q_dot).sum(dim=0, keepdim=True)
        Q_dot = Q_dot - (t_dot * y + t * y_dot) * u - (t * y) * u_dot
        Q = Q - (t * y) * u
    return batch_first(Q_dot * signs, tuple(X.shape[:-2])).contiguous()


# The helpers below work in place: they run only in _SmallHouseholder's forward and plain
# backward, where autograd does not record and vmap does not reach (its rule moves vmap's
# dimension into the batch).


def _rows_times(y: Tensor, Q: Tensor) -> Tensor:
    """``yᵀ Q`` for a batch-last vector ``(r, B)`` and matrix ``(r, k, B)``: ``(k, B)``."""
    if y.shape[0] > SMALL_SIZE:
        return (y.unsqueeze(1) * Q).sum(dim=0)
    # Row by row, in place: no (r, k, B) temporary (Note [Batches of small matrices] in
    # _small_matrices.py).
    out = Q[0] * y[0]
    for r in range(1, y.shape[0]):
        out.addcmul_(Q[r], y[r])
    return out


def _times_columns(Q: Tensor, g: Tensor) -> Tensor:
    """``Q g`` for a batch-last matrix ``(r, k, B)`` and vector ``(k, B)``: ``(r, B)``."""
    out = Q[:, 0] * g[0]
    for j in range(1, g.shape[0]):
        out.addcmul_(Q[:, j], g[j])
    return out


def _apply_reflector_(Q: Tensor, y: Tensor, tau: Tensor, i: int) -> Tensor:
    """``Q ← (I - τ y yᵀ) Q`` in place, ``y`` zero above row ``i``; returns ``yᵀ Q`` before."""
    w = _rows_times(y, Q[i:])
    Q[i:].addcmul_((tau * y).unsqueeze(1), w.unsqueeze(0), value=-1.0)
    return w


class _SmallHouseholder(torch.autograd.Function):
    """:func:`householder` on many small matrices; see Note [Householder reflectors one at a
    time]."""

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor]:
        k = X.shape[-1]
        Xb = batch_last(X)
        Y, tau, signs = _small_reflectors(Xb)
        Y.diagonal(dim1=0, dim2=1).fill_(1.0)
        Q = torch.zeros_like(Xb)
        Q.diagonal(dim1=0, dim2=1).fill_(1.0)
        for i in reversed(range(k)):
            _apply_reflector_(Q, Y[i:, i], tau[i], i)
        return batch_first(Q * signs, tuple(X.shape[:-2])).contiguous(), Q

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None], X: Tensor) -> Any:
        # The map batches over leading dimensions: vmap's is one more of them. The batch-last
        # copy kept for the backward has it among its last dimension's.
        batched = X.movedim(in_dims[0] or 0, 0)
        Q, Qb = _SmallHouseholder.apply(batched)  # type: ignore[no-untyped-call]  # untyped in torch
        return (Q, Qb.view(*Qb.shape[:2], info.batch_size, -1)), (0, 2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor, None]:
        (X,) = ctx.saved_tensors
        return _householder_small_autograd(X, X_dot), None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, Q = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True, or a torch.func transform: differentiable all the way.
            return torch.func.vjp(_householder_small_autograd, X)[1](grad)[0]
        k = X.shape[-1]
        Xb = batch_last(X)
        Y, tau, signs = _small_reflectors(Xb)
        Y.diagonal(dim1=0, dim2=1).fill_(1.0)
        # Ḡ with the signs, copied into the batch-last layout in the same pass.
        G = torch.mul(batch_last_view(grad), signs, out=torch.empty_like(Q))
        Q = Q.clone()
        X_bar = torch.zeros_like(Xb)
        for i in range(k):
            y, t = Y[i:, i], tau[i]
            u = _apply_reflector_(Q, y, t, i).neg_()  # yᵀ Qᵢ₊₁ = -yᵀ Qᵢ
            Gu = _times_columns(G[i:], u)
            g = _apply_reflector_(G, y, t, i)
            y_bar = _times_columns(Q[i:], g).add_(Gu).mul_(-t)
            tau_bar = (y * Gu).sum(dim=0).neg_()
            X_bar[i + 1 :, i] = y_bar[1:].addcmul_(y[1:], tau_bar * t * t, value=-1.0)
        return batch_first(X_bar, tuple(X.shape[:-2]))


_SmallHouseholderTraceable = traceable(_SmallHouseholder)
