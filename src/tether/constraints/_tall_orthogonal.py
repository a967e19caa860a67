"""Thin orthogonal weights in ``O(n k²)``: the columns of the maps, and a base stored as ``n x k``.

The orthogonal maps of ``tether.orthogonal`` send a tall original to the first ``k`` columns
of an ``n x n`` orthogonal matrix. Here those columns are computed through ``2k x 2k`` and
``k x k`` blocks, and the base point is kept as its ``k`` columns, so that nothing of size
``n x n`` is formed: see Note [Thin orthogonal weights].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from tether.functional import orthonormalize
from tether.functional._precision import precision_eps

__all__ = [
    "THIN_MIN_ROWS",
    "apply_base",
    "cayley_columns",
    "compact_base",
    "complement_coordinates",
    "exp_columns",
    "is_orthonormal",
    "is_thin",
]

# Note [Thin orthogonal weights]
#     A tall original X of shape (n, k) stands for the skew generator
#         S = [[A, -Bᴴ], [B, 0]],   A = L - Lᴴ with L the lower triangle of X's top k x k
#     block, B = X[k:] of shape (n - k, k) (A = 0 for the Grassmannian), and the weight is
#     base @ map(S)[:, :k] with an n x n orthogonal base. Formed as written, that is
#     O(n²) memory and O(n³) time; two facts bring it to O(n k) and O(n k²).
#
#     1. The columns. With E = [I; 0] and G = BᴴB, induction on j gives
#        Sʲ E = [Pⱼ; B Qⱼ], with Pⱼ₊₁ = A Pⱼ - G Qⱼ and Qⱼ₊₁ = Pⱼ, so
#            exp(S) E = [F₁; B F₂],   [F₁; F₂] = exp(K) [I; 0],   K = [[A, -G], [I, 0]],
#        a 2k x 2k exponential. K = diag(I, I/c) K_c diag(I, c I) with K_c = [[A, -G/c],
#        [c I, 0]] for any c > 0; c = ‖G‖_F^(1/2) ≥ ‖B‖₂ (at least 1, and held constant for
#        autograd, as the identity holds for every c) balances the blocks, so that the
#        exponential of K_c rounds about as the n x n skew one does. Unlike the reduction of
#        Edelman, Arias and Smith through the QR decomposition B = Q_B R, which is not
#        differentiable where B loses rank, this is smooth everywhere, B = 0 included, where
#        every original starts (the neutral point). For the Cayley map, solving
#        (I - S/2) [F₁; B F₂] = (I + S/2) E gives
#            cayley(S) E = [2 D⁻¹ - I; B D⁻¹],   D = I + G/4 - A/2,
#        one k x k inverse; D's Hermitian part is at least I, so D is always invertible.
#        The Householder map forms its k columns in O(n k²) already.
#
#     2. The base. Any orthogonal completion [U, U⊥] of the base's columns U serves: the
#        weight is U M + U⊥ P for the columns [M; P] of the map (PyTorch draws U⊥ at
#        random). The Householder reflectors of the QR decomposition U = H₁⋯H_k [R; 0]
#        determine one: U⊥ = (H₁⋯H_k)[:, k:], since (H₁⋯H_k)ᴴ U = [R; 0]. In compact WY form
#        H₁⋯H_k = I - Y T Yᴴ, with Y the unit lower trapezoid of the reflectors and
#        T = (I + diag(τ) triu(YᴴY, 1))⁻¹ diag(τ) (Note [Compact WY form] in
#        tether.functional._householder, here with LAPACK's τ, 0 for a skipped reflection), so
#            U⊥ P = [0; P] - Y T (Y[k:]ᴴ P),
#        two n x k by k x k products. The base is therefore stored as U, shape (*, n, k),
#        and the reflectors are computed again from it at each use (a QR of U, O(n k²),
#        without gradient: the base is a constant of the map).
#
#     A weight is thin when n > 2k and n > THIN_MIN_ROWS. Other tall weights keep PyTorch's
#     square base and the n x n formulation: for n ≤ 2k it costs no more than a constant
#     times the thin one (O(k³) = O(n k²), and an n x n base holds at most twice the weight),
#     and for small n it costs nothing worth a layout of its own; both keep PyTorch's
#     state_dict, so their checkpoints move between the two libraries. A thin weight's base
#     is not PyTorch's: docs/serialization.md says how checkpoints cross.
#
#     References: The Geometry of Algorithms with Orthogonality Constraints. Alan Edelman,
#     Tomás A. Arias, Steven T. Smith, 1998. https://doi.org/10.1137/S0895479895290954;
#     A Storage-Efficient WY Representation for Products of Householder Transformations.
#     Robert Schreiber, Charles Van Loan, 1989. https://doi.org/10.1137/0910005

# Tall weights with at most this many rows keep the square base (Note [Thin orthogonal
# weights]): its 4096 entries, and an O(n³) map of that size, cost next to nothing.
THIN_MIN_ROWS = 64


def is_thin(n: int, k: int) -> bool:
    """Whether a tall ``n x k`` weight is thin: Note [Thin orthogonal weights]."""
    return n > 2 * k and n > THIN_MIN_ROWS


def _gram(B: Tensor) -> Tensor:
    return B.mH @ B


def exp_columns(A: Tensor | None, B: Tensor) -> Tensor:
    """The first ``k`` columns of ``exp([[A, -Bᴴ], [B, 0]])``, through a ``2k x 2k`` exponential.

    Args:
        A: skew, shape ``(*, k, k)``; ``None`` for zero (the Grassmannian).
        B: shape ``(*, n - k, k)``.

    Returns:
        Shape ``(*, n, k)``. See Note [Thin orthogonal weights].
    """
    k = B.shape[-1]
    G = _gram(B)
    with torch.no_grad():
        c = torch.linalg.matrix_norm(G).sqrt().clamp(min=1.0).unsqueeze(-1).unsqueeze(-1)
    eye = torch.eye(k, dtype=B.dtype, device=B.device)
    top = torch.cat([torch.zeros_like(G) if A is None else A, -G / c], dim=-1)
    bottom = torch.cat([(eye * c).expand_as(G), torch.zeros_like(G)], dim=-1)
    F12 = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))[..., :k]
    return torch.cat([F12[..., :k, :], B @ (F12[..., k:, :] / c)], dim=-2)


def cayley_columns(A: Tensor | None, B: Tensor) -> Tensor:
    """The first ``k`` columns of ``cayley([[A, -Bᴴ], [B, 0]])``, through a ``k x k`` inverse.

    Args:
        A: skew, shape ``(*, k, k)``; ``None`` for zero (the Grassmannian).
        B: shape ``(*, n - k, k)``.

    Returns:
        Shape ``(*, n, k)``. See Note [Thin orthogonal weights].
    """
    k = B.shape[-1]
    eye = torch.eye(k, dtype=B.dtype, device=B.device)
    D = eye + _gram(B) / 4
    if A is not None:
        D = D - A / 2
    inverse = torch.linalg.inv(D)
    return torch.cat([2 * inverse - eye, B @ inverse], dim=-2)


# Note [The reflectors of the compact base as a custom operator]
#     torch.geqrf has no meta or fake implementation, so a thin weight could be neither built
#     on the meta device nor traced by torch.compile. The reflectors are therefore computed
#     by a custom operator, tether::compact_base_reflectors, with a fake implementation
#     (shapes only) and a vmap rule. It needs no derivative: the base is a constant of the
#     map, and the operator is given it detached.


@torch.library.custom_op("tether::compact_base_reflectors", mutates_args=())
def _reflectors_op(U: Tensor) -> tuple[Tensor, Tensor]:
    """``Y`` and ``T`` of the compact WY form of the reflectors of ``U``'s QR decomposition."""
    Y, tau = torch.geqrf(U)
    Y = Y.tril(-1)
    Y.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    # T = (I + diag(τ) N)⁻¹ diag(τ), N the strict upper triangle of YᴴY; the solve reads
    # only that triangle (unit diagonal).
    N = (Y.mH @ Y).mul_(tau.unsqueeze(-1))
    T = torch.linalg.solve_triangular(N, torch.diag_embed(tau), upper=True, unitriangular=True)
    # Contiguous, as the fake outputs are (geqrf returns column-major matrices).
    return Y.contiguous(), T.contiguous()


@_reflectors_op.register_fake
def _(U: Tensor) -> tuple[Tensor, Tensor]:
    k = U.shape[-1]
    return U.new_empty(U.shape), U.new_empty((*U.shape[:-2], k, k))


def _reflectors_vmap(
    info: Any, in_dims: tuple[int | None], U: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[int | None, int | None]]:
    # The operator batches over leading dimensions already.
    (dim,) = in_dims
    if dim is None:
        return _reflectors_op(U), (None, None)
    return _reflectors_op(U.movedim(dim, 0)), (0, 0)


_reflectors_op.register_vmap(_reflectors_vmap)


def _reflectors(U: Tensor) -> tuple[Tensor, Tensor]:
    """``Y`` and ``T`` of the compact WY form of the reflectors of ``U``'s QR decomposition."""
    return _reflectors_op(U.detach())


def apply_base(U: Tensor, Q: Tensor) -> Tensor:
    """``[U, U⊥] @ Q`` for a compact base ``U`` of shape ``(*, n, k)`` and ``Q`` of ``(*, n, k)``.

    ``U⊥`` is the complement that the Householder reflectors of ``U`` define (Note [Thin
    orthogonal weights]); ``O(n k²)``.
    """
    k = U.shape[-1]
    Y, T = _reflectors(U)
    M, P = Q[..., :k, :], Q[..., k:, :]
    C = T @ (Y[..., k:, :].mH @ P)
    return U @ M - Y @ C + F.pad(P, (0, 0, k, 0))


def complement_coordinates(U: Tensor, W: Tensor) -> Tensor:
    """``[U, U⊥]ᴴ W``: the coordinates in the base ``U`` (compact) of a tall ``W``.

    The inverse of :func:`apply_base`; ``O(n k²)``.
    """
    k = U.shape[-1]
    Y, T = _reflectors(U)
    # (I - Y T Yᴴ)ᴴ W, of which the rows from k on are U⊥ᴴ W.
    complement = W[..., k:, :] - Y[..., k:, :] @ (T.mH @ (Y.mH @ W))
    return torch.cat([U.mH @ W, complement], dim=-2)


def is_orthonormal(Q: Tensor) -> bool:
    """Whether the columns of a tall ``Q`` are orthonormal, to ``10 n`` times the rounding."""
    k = Q.shape[-1]
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    return torch.allclose(Q.mH @ Q, eye, atol=10.0 * Q.shape[-2] * precision_eps(Q))


def compact_base(Q: Tensor) -> Tensor:
    """The compact base for a tall ``Q``: ``Q`` if its columns are orthonormal, else the ``Q`` of
    its QR decomposition (what :func:`tether.functional.orthonormalize` returns)."""
    # On the meta device there are no values to check: only shapes matter there.
    return Q.clone() if not Q.is_meta and is_orthonormal(Q) else orthonormalize(Q)
