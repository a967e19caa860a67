"""Maps onto orthogonal and unitary matrices, and onto matrices with orthonormal columns."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._cayley import (
    SMALL_BATCH,
    SMALL_SIZE,
    _entries,
    _matrix,
    _reduce,
    _rows,
    _vmap_rule,
    batch_first,
    batch_last,
    batch_last_view,
    cayley,
)
from tether.functional._traceable import traceable

__all__ = ["cayley", "householder", "matrix_exp", "orthonormalize", "polar"]

HouseholderAlgorithm = Literal["auto", "wy", "torch"]

# Fewest reflectors for which householder(algorithm="auto") takes the compact WY form.
_WY_MIN_COLUMNS = 8


def matrix_exp(A: Tensor) -> Tensor:
    """The matrix exponential ``exp(A)``: orthogonal (unitary) for skew (skew-Hermitian) ``A``.

    A general exponential (:func:`torch.linalg.matrix_exp`), for any square ``A``, with
    second derivatives. For skew ``A`` on a CPU, :func:`skew_matrix_exp` is several times
    faster forward and backward; it is what ``orthogonal_map="matrix_exp"`` uses.

    Args:
        A: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import matrix_exp
        >>> X = torch.randn(4, 4, dtype=torch.float64)
        >>> Q = matrix_exp(X - X.mT)
        >>> torch.allclose(Q.mT @ Q, torch.eye(4, dtype=torch.float64))
        True
    """
    return torch.linalg.matrix_exp(A)


# Note [Compact WY form]
#     The product H₁ ⋯ H_k of the reflectors Hᵢ = I - τᵢ yᵢ yᵢᵀ, τᵢ = 2 / yᵢᵀyᵢ, is I - Y T Yᵀ
#     with T upper triangular and T⁻¹ = triu(YᵀY, 1) + diag(1/τ) (the "UT transform" of
#     Joffrain et al. 2006), that is T = diag(τ) (I + N)⁻¹ with N the strict upper triangle of
#     YᵀY diag(τ). The first k columns are E - Y M, M = diag(τ) K, K = (I + N)⁻¹ Y₁ᵀ, with Y₁
#     the top k x k block of Y and E the first k columns of I: two matrix products and a
#     unit-triangular solve (which reads only the strict triangle, so N needs no masking),
#     done from the right as Kᵀ = Y₁ (I + N)⁻ᵀ, which LAPACK does faster on a CPU.
#     torch.linalg.householder_product applies the reflectors one at a time, and so does its
#     backward, which is what makes it slow.
#
#     The backward (_Householder) follows the same steps in reverse: with G the cotangent of
#     E - Y M, Ȳ = -G Mᵀ, M̄ = -Yᵀ G; through the solve, R = (I + N)⁻ᵀ K̄ adds Rᵀ to Ȳ₁ and
#     -triu(R Kᵀ, 1) to N̄; through N = triu(P) diag(τ) and τᵢ = 2 / Pᵢᵢ, P = YᵀY, to P̄
#     (τ is computed by a sum of its own, but its derivative is the same); and
#     Ȳ += Y (P̄ + P̄ᵀ). Four products and one solve, with the scalings done in place on
#     k x k factors. When the gradient may be differentiated again
#     (create_graph=True, torch.func transforms) the backward is instead the vjp of
#     _householder_autograd, the same computation left to autograd, about as fast. The
#     forward-mode derivative (jvp) recomputes the factors from X for the same reason
#     (torch.func still cannot nest forward mode over a custom autograd.Function: the jvp of
#     a jvp comes out as if the first were constant).

# Note [Memory of the Householder backward]
#     The forward keeps X (held anyway, as the original) and one k x k matrix for the
#     backward. K = (I + N)⁻¹ Y₁ᵀ is unit upper triangular (both factors are), so
#     M = diag(τ) K diag(-signs) is upper triangular, and the solves read only N's strict
#     upper triangle: the lower triangle of Mᵀ and the strict upper one of N share a matrix.
#     The backward rebuilds Y from X (a copy, at its start and at its end) and Mᵀ from that
#     matrix, and drops each temporary once used; N̄ enters only as N̄ diag(τ) = -triu(R
#     diag(-signs) Mᵀ, 1), without K. Ȳ = G Mᵀ + [Rᵀ; 0] + Y (P̄ + P̄ᵀ) is assembled last,
#     in Rᵀ's memory for a square X, with in-place products (addmm_), so that at most three
#     n x k or k x k temporaries are alive at once beside the cotangent. Keeping Y, N, K and
#     M instead saves three copies (a few percent of the time) but holds more than
#     householder_product, whose backward keeps its input and output; this holds less
#     (benchmarks/orthogonal_maps.py, peak memory).


def _reflectors(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Y`` (the unit lower trapezoid of ``X``), ``τ`` and the signs of ``X``'s diagonal."""
    # τ from a sum of its own rather than from the diagonal of YᵀY: a reflector is
    # orthogonal only as far as τ = 2 / yᵀy is accurate, and a long matrix product rounds
    # more than a (pairwise) sum.
    tau = 2.0 / (1.0 + X.tril(-1).square().sum(dim=-2))
    signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
    return _unit_trapezoid(X), tau, signs


def _unit_trapezoid(X: Tensor) -> Tensor:
    """The strict lower triangle of ``X`` with ones on the diagonal."""
    Y = X.tril(-1)
    Y.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return Y


def _householder_autograd(X: Tensor) -> Tensor:
    """:func:`householder` with every step recorded by autograd (for second derivatives)."""
    n, k = X.shape[-2], X.shape[-1]
    Y, tau, signs = _reflectors(X)
    N = (Y.mT @ Y) * tau.unsqueeze(-2)
    Kh = torch.linalg.solve_triangular(
        N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
    )
    Q = Y @ (Kh.mT * (tau.unsqueeze(-1) * -signs.unsqueeze(-2)))
    return Q + torch.eye(n, k, dtype=X.dtype, device=X.device) * signs.unsqueeze(-2)


def _householder_jvp(X: Tensor, X_dot: Tensor) -> Tensor:
    """The derivative of :func:`householder` at ``X`` in the direction ``X_dot``.

    Recomputed from ``X`` with differentiable operations, so that nested transforms can
    differentiate it again (forward mode is rare; speed matters less than that).
    """
    k = X.shape[-1]
    Y, tau, signs = _reflectors(X)
    N = (Y.mT @ Y) * tau.unsqueeze(-2)
    Kh = torch.linalg.solve_triangular(
        N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
    )
    scale = tau.unsqueeze(-1) * -signs.unsqueeze(-2)
    M = Kh.mT * scale
    # τ = 2 / (1 + ‖aᵢ‖²); N = triu(YᵀY) diag(τ); K = (I + N)⁻¹ Y₁ᵀ; Q = E S + Y M.
    Y_dot = X_dot.tril(-1)
    tau_rate = -(Y * Y_dot).sum(dim=-2) * tau  # τ̇ / τ
    P_dot = Y.mT @ Y_dot
    N_dot = (P_dot + P_dot.mT) * tau.unsqueeze(-2) + N * tau_rate.unsqueeze(-2)
    K_dot = torch.linalg.solve_triangular(
        N, Y_dot[..., :k, :].mT - N_dot.triu(1) @ Kh.mT, upper=True, unitriangular=True
    )
    M_dot = M * tau_rate.unsqueeze(-1) + K_dot * scale
    return Y_dot @ M + Y @ M_dot


class _Householder(torch.autograd.Function):
    """The first ``k`` columns of ``H₁ ⋯ H_k``, signed; see Note [Compact WY form]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, ...]:
        k = X.shape[-1]
        # _reflectors(X), with one copy of X fewer (nothing is recorded here).
        Y = X.tril(-1)
        tau = 2.0 / (1.0 + Y.square().sum(dim=-2))
        Y.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
        N = (Y.mT @ Y).mul_(tau.unsqueeze(-2))
        Kh = torch.linalg.solve_triangular(
            N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
        )
        # (E - Y diag(τ) K) diag(signs): the scalings go on the k x k factor.
        M = Kh.mT.mul_(tau.unsqueeze(-1)).mul_(-signs.unsqueeze(-2))
        Q = Y @ M
        del Y
        Q.diagonal(dim1=-2, dim2=-1).add_(signs)
        # M is upper triangular and only N's strict upper triangle is used: one k x k
        # matrix keeps both for the backward (Note [Memory of the Householder backward]).
        lower = torch.ones(k, k, dtype=torch.bool, device=X.device).tril()
        return Q, torch.where(lower, M.mT, N), tau, signs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs kept internal
        ctx.save_for_backward(inputs[0], *saved)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor | None, ...]:
        (X,) = ctx.saved_tensors
        return _householder_jvp(X, X_dot), None, None, None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, packed, tau, signs = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True, or a torch.func transform: a gradient that can be
            # differentiated again, by differentiating the computation left to autograd.
            vjp = torch.func.vjp(_householder_autograd, X)[1]
            return vjp(grad)[0]
        k = packed.shape[-1]
        # The order, and the in-place steps, keep at most three temporaries alive beside
        # the cotangent (Note [Memory of the Householder backward]).
        M_bar = _unit_trapezoid(X).mT @ grad
        Mt = packed.tril()  # Mᵀ
        tau_bar = (M_bar.mT * Mt).sum(dim=-2).div_(tau)
        K_bar = M_bar.mul_(tau.unsqueeze(-1)).mul_(-signs.unsqueeze(-2))
        Rh = torch.linalg.solve_triangular(
            packed, K_bar.mT, upper=True, left=False, unitriangular=True
        )
        del K_bar, M_bar
        # N̄ diag(τ) = -triu(R Kᵀ diag(τ), 1), and Kᵀ diag(τ) = diag(-signs) Mᵀ.
        P_bar = Rh.mT @ Mt.mul_(-signs.unsqueeze(-1))
        del Mt
        P_bar.triu_(1).neg_()
        tau_bar += (P_bar * packed).sum(dim=-2).div_(tau).div_(tau)
        P_bar = P_bar + P_bar.mT
        # τᵢ = 2 / (1 + ‖aᵢ‖²) = 2 / Pᵢᵢ puts -τᵢ² τ̄ᵢ / 2 on P̄ᵢᵢ, twice in P̄ + P̄ᵀ.
        P_bar.diagonal(dim1=-2, dim2=-1).sub_(tau_bar.mul_(tau).mul_(tau))
        # Ȳ = Y P̄ + [Rᵀ; 0] + G Mᵀ, accumulated in Rᵀ's memory for a square X.
        Y = _unit_trapezoid(X)
        if X.shape[-2] == k:
            Y_bar = _add_product_(Rh, Y, P_bar)
        else:
            Y_bar = Y @ P_bar
            Y_bar[..., :k, :] += Rh
        del Y, P_bar, Rh
        return _add_product_(Y_bar, grad, packed.tril()).tril_(-1)


_HouseholderTraceable = traceable(_Householder)


def _add_product_(out: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``out += A @ B`` without a temporary for the product (same batch shapes)."""
    # In place: this backward never runs under torch.func.vmap (there gradients are
    # recorded, and the branch above is taken), where addmm_ has no batching rule.
    if out.dim() == 2:
        return out.addmm_(A, B)
    if out.dim() == 3:
        return out.baddbmm_(A, B)
    out += A @ B
    return out


# Note [Householder reflectors one at a time]
#     For a batch of many matrices with few columns, _SmallHouseholder applies the reflectors
#     to E (the first k columns of I) one at a time, last first, in the batch-last layout
#     (Note [Batches of small matrices]): Qᵢ = Hᵢ Qᵢ₊₁ = Qᵢ₊₁ - τ y uᵀ with u = yᵀ Qᵢ₊₁, Q₀
#     the result (before the signs). Its backward walks the other way and recomputes
#     Qᵢ₊₁ = Hᵢ Qᵢ (a reflector is its own inverse, and orthogonal, so no error grows) instead
#     of storing every Qᵢ: with Ḡ the cotangent of Qᵢ and g = Ḡᵀ y, the reflector's vector
#     gets ȳ = -τ (Ḡ u + Qᵢ₊₁ g), its τ = 2 / (1 + ‖v‖²) gets τ̄ = -yᵀ Ḡ u (which reaches v
#     as -τ² τ̄ v), and Qᵢ₊₁ gets Hᵢ Ḡ = Ḡ - τ y gᵀ. Each step is a few multiply-adds in
#     place, where autograd's record of the same loop allocates several times as much (on a
#     CPU, fresh memory costs page faults that take longer than the arithmetic on it).
#     Second derivatives and forward mode differentiate _householder_small_autograd instead.


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
    # Row by row, in place: no (r, k, B) temporary (Note [Batches of small matrices]).
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


# Note [Householder reflectors after a base point]
#     The orthogonal constraint computes W = base Q, Q = H₁ ⋯ Hₙ D for a square X (D the
#     signs of the diagonal). For a batch of matrices of 2 x 2 or 3 x 3 (convolution
#     kernels), _BaseHouseholder applies the reflectors to the base from the right,
#     Bᵢ = Bᵢ₋₁ Hᵢ = Bᵢ₋₁ - τ (Bᵢ₋₁ y) yᵀ from B₀ = base, in entries (each a vector over the
#     batch, as in Note [The Cayley map of a lower triangle, with its base point]): the last
#     reflector (y = eₙ, τ = 2) only negates the last column, and D scales columns, so that
#     W = Bₙ₋₁ D' with D' = D diag(1, ..., 1, -1). The backward walks back from
#     B̄ₙ₋₁ = W̄ D' with the forward's Bᵢ recomputed from the base: for Bᵢ = Bᵢ₋₁ - τ p yᵀ,
#     p = Bᵢ₋₁ y and g = B̄ᵢ y, ȳ = -τ (Bᵢ₋₁ᵀ g + B̄ᵢᵀ p), τ̄ = -pᵀ g (reaching the reflector's
#     vector v as τ² (pᵀ g) v, from τ = 2/(1 + |v|²)) and B̄ᵢ₋₁ = B̄ᵢ - τ g yᵀ. The product
#     with the base costs no batched matrix product (slow on tiny matrices) either way.


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


class _BaseHouseholder(torch.autograd.Function):
    """``base @ householder(X)`` for many square ``X`` of 2 x 2 or 3 x 3; Note [Householder
    reflectors after a base point]. The second output keeps the base's entries."""

    @staticmethod
    def forward(X: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
        n = X.shape[-1]
        x = _entries(X)
        base_rows = _rows(base.expand_as(X))
        B = list(base_rows.unbind(0))
        for i, (v, tau) in enumerate(_reflector_entries(x, n)):
            B = _reflect_rows(B, n, i, v, tau)
        scales = _column_scales(x, n)
        W = [entry * scales[k % n] for k, entry in enumerate(B)]
        return _matrix(W, X), base_rows

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
        X, base, base_rows = ctx.saved_tensors
        if torch.is_grad_enabled():  # a gradient to be differentiated again
            return torch.func.vjp(_base_householder_autograd, X, base)[1](grad)
        n = X.shape[-1]
        x = _entries(X)
        reflectors = _reflector_entries(x, n)
        Bs = [list(base_rows.unbind(0))]  # B₀ .. Bₙ₋₂, the inputs of the reflectors
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


def _householder_torch(X: Tensor) -> Tensor:
    """:func:`householder` with :func:`torch.linalg.householder_product`."""
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau)
    signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


def householder_path(device_type: str, k: int, batch: int = 1) -> str:
    """The path of ``householder(..., algorithm="auto")`` for ``batch`` matrices of ``k``
    columns on a device of type ``device_type``; pure, so that it can be tested for devices
    that are not at hand.

    ``"loop"`` (Note [Householder reflectors one at a time]) for batches of at least
    SMALL_BATCH matrices of fewer than _WY_MIN_COLUMNS columns, ``"torch"`` for fewer such
    matrices, ``"wy"`` from _WY_MIN_COLUMNS columns on; the same on every device (each runs
    on the device without reading a value; the thresholds are measured on a CPU).
    """
    if k >= _WY_MIN_COLUMNS:
        return "wy"
    return "loop" if batch >= SMALL_BATCH else "torch"


def householder(X: Tensor, *, algorithm: HouseholderAlgorithm = "auto") -> Tensor:
    """Orthonormal columns from the reflectors below the diagonal of a tall ``X``.

    The column ``i`` of the strictly lower triangle of ``X`` (with a 1 on the diagonal) is the
    vector ``v_i`` of the reflector ``I - 2 v vᵀ / vᵀv``; the result is the product of the
    reflectors (first ``k`` columns), with the sign of column ``i`` taken from the sign of
    ``X[i, i]`` (so that every orthogonal matrix is reached). PyTorch truncates ``X[i, i]`` to
    an integer instead, which zeroes the column when ``|X[i, i]| < 1`` (after weight decay,
    say); both agree on the ``±1`` diagonals that ``right_inverse`` produces.

    With ``algorithm="wy"`` the product is formed at once in compact WY form (Note [Compact
    WY form]): two matrix products and a triangular solve forward, four and one backward.
    Forward plus backward, that is 6x faster than :func:`torch.linalg.householder_product`
    (``"torch"``, which applies the reflectors one at a time) at ``n = k = 256`` on a CPU,
    14x at 1024, and 15-100x for tall matrices, with a lower peak memory (its backward keeps
    ``X`` and one ``k x k`` matrix). ``"auto"`` takes ``"wy"`` from
    ``k = 8`` reflectors on; below that the two cost about the same and ``"torch"`` gives
    PyTorch's own rounding, except for batches of 32 matrices or more (convolution kernels),
    which ``"auto"`` gives to a loop over the reflectors in a batch-last layout with a
    hand-written backward (Note [Householder reflectors one at a time]): 6x faster than
    ``"torch"`` forward plus backward on the 65,536 matrices of 3 x 3 of a
    ``Conv2d(256, 256, 3)`` on a CPU, 8x on those of 2 x 2. All of them support second
    derivatives and forward-mode AD, and none synchronises with the device.

    Args:
        X: real, shape ``(*, n, k)`` with ``n >= k``.
        algorithm: ``"auto"``, ``"wy"`` or ``"torch"``, see above.

    Returns:
        Orthonormal columns, shape ``(*, n, k)``, the dtype and device of ``X``.

    Raises:
        ValueError: ``X`` is complex, or ``algorithm`` is not one of the above.

    References:
        A Storage-Efficient WY Representation for Products of Householder Transformations.
        Robert Schreiber, Charles Van Loan, 1989. https://doi.org/10.1137/0910005

        Accumulating Householder Transformations, Revisited. Thierry Joffrain, Tze Meng
        Low, Enrique S. Quintana-Ortí, Robert van de Geijn, Field G. Van Zee, 2006.
        https://doi.org/10.1145/1141885.1141886

    Example:
        >>> import torch
        >>> from tether.functional import householder
        >>> Q = householder(torch.randn(5, 3, dtype=torch.float64))
        >>> torch.allclose(Q.mT @ Q, torch.eye(3, dtype=torch.float64))
        True
    """
    if X.is_complex():
        raise ValueError(
            f"householder() needs a real tensor; got {X.dtype}. For unitary matrices use "
            "matrix_exp or cayley."
        )
    if algorithm not in ("auto", "wy", "torch"):
        raise ValueError(
            f"householder(): `algorithm` must be one of 'auto', 'wy', 'torch'; got {algorithm!r}."
        )
    path: str = algorithm
    if algorithm == "auto":
        path = householder_path(X.device.type, X.shape[-1], math.prod(X.shape[:-2]))
    if path == "loop":
        small = _SmallHouseholderTraceable if torch.compiler.is_compiling() else _SmallHouseholder
        Q, _ = small.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
        return Q
    if path == "torch":
        return _householder_torch(X)
    function = _HouseholderTraceable if torch.compiler.is_compiling() else _Householder
    Q, *_ = function.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q


def orthonormalize(X: Tensor) -> Tensor:
    """Orthonormal columns spanning those of a tall ``X``: the ``Q`` of its QR decomposition.

    The signs are fixed so that ``R`` has a positive diagonal, which makes the map continuous
    and the identity on matrices that already have orthonormal columns.

    Args:
        X: shape ``(*, n, k)`` with ``n >= k``, full column rank.

    Example:
        >>> import torch
        >>> from tether.functional import orthonormalize
        >>> Q = orthonormalize(torch.randn(5, 3, dtype=torch.float64))
        >>> torch.allclose(orthonormalize(Q), Q)
        True
    """
    Q, R = torch.linalg.qr(X)
    signs = R.diagonal(dim1=-2, dim2=-1).sgn()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


def polar(X: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns to a tall ``X`` (its polar factor ``U Vᴴ``).

    Nearest in the Frobenius norm: this is the projection onto the Stiefel manifold.

    Args:
        X: shape ``(*, n, k)`` with ``n >= k``.
    """
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh
