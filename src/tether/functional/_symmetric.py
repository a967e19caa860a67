"""Maps onto symmetric, skew-symmetric, positive definite and positive semidefinite matrices.

Every map works on real and complex tensors: for complex ones read Hermitian for symmetric,
``Xᴴ`` for ``Xᵀ`` and unitary for orthogonal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from tether.functional._elementwise import softplus_inverse
from tether.functional._orthogonal import orthonormalize
from tether.functional._precision import precision_eps
from tether.functional._spectral import rebuild, spectral

__all__ = [
    "fixed_rank_psd",
    "fixed_rank_psd_factors",
    "gram",
    "gram_factor",
    "skew_part",
    "spd_exp",
    "spd_log",
    "spd_softplus",
    "spd_softplus_inverse",
    "symmetric_part",
]


def symmetric_part(X: Tensor) -> Tensor:
    """The symmetric (Hermitian) part ``(X + Xᴴ) / 2`` of a square ``X``.

    The orthogonal projection onto the symmetric matrices, so it is its own right inverse: it
    leaves a symmetric ``X`` as it is.

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import symmetric_part
        >>> S = symmetric_part(torch.randn(3, 3))
        >>> torch.equal(S, S.mT), torch.equal(symmetric_part(S), S)
        (True, True)
    """
    return (X + X.mH) / 2


def skew_part(X: Tensor) -> Tensor:
    """The skew-symmetric (skew-Hermitian) part ``(X - Xᴴ) / 2`` of a square ``X``.

    The orthogonal projection onto the skew matrices, so it is its own right inverse.

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import skew_part
        >>> A = skew_part(torch.randn(3, 3))
        >>> torch.equal(A, -A.mT), torch.equal(skew_part(A), A)
        (True, True)
    """
    return (X - X.mH) / 2


def spd_exp(X: Tensor) -> Tensor:
    """The exponential ``exp(S)`` of the symmetric part ``S`` of ``X``: positive definite.

    A diffeomorphism from the symmetric matrices onto the positive definite ones; its right
    inverse is :func:`spd_log`. Eigenvalues ``λ`` of ``S`` become ``exp(λ)``, so the map
    works on a log scale: good for weights whose eigenvalues span orders of magnitude.

    Computed from one ``torch.linalg.eigh``, with a backward of four matrix products that is
    exact at repeated eigenvalues too: forward plus backward is about ten times faster than
    through ``torch.linalg.matrix_exp`` at ``n = 1024``. Second derivatives with
    ``create_graph=True`` are exact (recomputed through ``torch.linalg.matrix_exp``); forward
    mode (``torch.func.jvp``) is first order.

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import spd_exp, spd_log
        >>> A = spd_exp(torch.randn(4, 4, dtype=torch.float64))
        >>> bool(torch.linalg.eigvalsh(A).min() > 0), torch.allclose(spd_exp(spd_log(A)), A)
        (True, True)
    """
    return spectral(
        symmetric_part(X), torch.exp, torch.exp, reference=torch.linalg.matrix_exp, name="spd_exp"
    )


def spd_log(A: Tensor) -> Tensor:
    """The symmetric logarithm of a positive definite ``A``: the right inverse of :func:`spd_exp`.

    ``Q diag(log λ) Qᴴ`` from ``torch.linalg.eigh`` of the symmetric part of ``A``, after
    raising the eigenvalues to the floor of Note [Eigenvalue floor] (``sqrt(eps)`` times the
    largest ``|λ|``), so that any square ``A`` has a finite result: the logarithm of a positive
    definite matrix close to ``A``. Differentiable where the eigenvalues are distinct; meant
    for setting weights, under ``torch.no_grad()``.

    Args:
        A: shape ``(*, n, n)``.
    """
    L, Q = _eigh_above_floor(A)
    return rebuild(Q, torch.log(L))


def spd_softplus(X: Tensor) -> Tensor:
    """Softplus applied to the eigenvalues of the symmetric part of ``X``: positive definite.

    ``Q diag(softplus(λ)) Qᴴ`` for ``S = Q diag(λ) Qᴴ``; the right inverse is
    :func:`spd_softplus_inverse`. Softplus is close to the identity for large eigenvalues, so
    this map behaves like a plain symmetric matrix away from zero and only bends near it.
    Differentiable everywhere, repeated eigenvalues included, to first order: second
    derivatives are not supported (see Note [Gradients of spectral functions] in the source).

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import spd_softplus, spd_softplus_inverse
        >>> A = spd_softplus(torch.randn(4, 4, dtype=torch.float64))
        >>> bool(torch.linalg.eigvalsh(A).min() > 0)
        True
        >>> torch.allclose(spd_softplus(spd_softplus_inverse(A)), A)
        True
    """
    return spectral(symmetric_part(X), F.softplus, torch.sigmoid, name="spd_softplus")


def spd_softplus_inverse(A: Tensor) -> Tensor:
    """The right inverse of :func:`spd_softplus`: inverse softplus of the eigenvalues of ``A``.

    ``Q diag(log(exp(λ) - 1)) Qᴴ`` for the symmetric part of ``A``, after raising ``λ`` to
    the floor of Note [Eigenvalue floor], as :func:`spd_log` does.

    Args:
        A: shape ``(*, n, n)``.
    """
    L, Q = _eigh_above_floor(A)
    return rebuild(Q, softplus_inverse(L))


def gram(B: Tensor) -> Tensor:
    """The Gram matrix ``B Bᴴ``: positive semidefinite, of rank at most ``k``.

    The right inverse is :func:`gram_factor`. A polynomial map: cheap (``O(n² k)``) and with
    smooth gradients everywhere, at the price of a factor that is unique only up to
    ``B ↦ B U`` with ``U`` orthogonal.

    Args:
        B: shape ``(*, n, k)``.

    Example:
        >>> import torch
        >>> from tether.functional import gram, gram_factor
        >>> A = gram(torch.randn(5, 2, dtype=torch.float64))
        >>> torch.allclose(gram(gram_factor(A, rank=2)), A)
        True
    """
    return symmetric_part(B @ B.mH)


def _nonnegative_sqrt(L: Tensor) -> Tensor:
    return L.clamp(min=0).sqrt()


def gram_factor(A: Tensor, rank: int | None = None) -> Tensor:
    """A factor ``B`` with ``B Bᴴ = A`` for a positive semidefinite ``A``: inverts :func:`gram`.

    With ``rank=None``, the positive semidefinite square root ``A^(1/2)``, of shape
    ``(*, n, n)``; with ``rank=r``, ``Q_r diag(λ_r)^(1/2)`` from the ``r`` largest eigenpairs,
    of shape ``(*, n, r)``. For any other ``A`` the result is the factor of the nearest (in
    the Frobenius norm) positive semidefinite matrix of rank at most ``r``: the symmetric
    part of ``A`` with its negative eigenvalues, and all but the ``r`` largest, set to zero.

    Not differentiable where an eigenvalue is zero (the square root is not); meant for
    setting weights, under ``torch.no_grad()``. ``O(n² r)`` for an ``A`` of rank at most
    ``2r`` (to rounding), ``O(n³)`` otherwise: Note [Eigenpairs of a symmetric matrix of low
    rank].

    Args:
        A: shape ``(*, n, n)``.
        rank: the number of columns of the factor, ``1 <= rank <= n``, or ``None`` for ``n``
            and the symmetric square root.
    """
    S = symmetric_part(A)
    pairs = None if rank is None else low_rank_eigh(S, rank)
    L, Q = torch.linalg.eigh(S) if pairs is None else (pairs.values, pairs.vectors)
    if rank is None:
        return rebuild(Q, _nonnegative_sqrt(L))
    # eigh sorts the eigenvalues in ascending order: the largest are the last ones.
    return Q[..., -rank:] * _nonnegative_sqrt(L[..., -rank:]).unsqueeze(-2).to(Q.dtype)


def fixed_rank_psd(B: Tensor, s: Tensor) -> Tensor:
    """``Q diag(softplus(s)) Qᴴ`` with ``Q`` the orthonormalized columns of ``B``: rank ``r``.

    Positive semidefinite with exactly ``r`` positive eigenvalues, ``softplus(s)``, on the
    column space of ``B``. The right inverse is :func:`fixed_rank_psd_factors`.

    Args:
        B: shape ``(*, n, r)`` with ``n >= r``, of full column rank.
        s: shape ``(*, r)``.

    Example:
        >>> import torch
        >>> from tether.functional import fixed_rank_psd, fixed_rank_psd_factors
        >>> A = fixed_rank_psd(torch.randn(5, 2), torch.randn(2))
        >>> int(torch.linalg.matrix_rank(A))
        2
    """
    return rebuild(orthonormalize(B), F.softplus(s))


def fixed_rank_psd_factors(A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(Q, s)`` with ``fixed_rank_psd(Q, s) = A`` for a positive semidefinite ``A`` of rank ``r``.

    ``Q`` holds the eigenvectors of the ``r`` largest eigenvalues ``λ`` of the symmetric part
    of ``A`` (orthonormal columns, which :func:`tether.functional.orthonormalize` leaves as
    they are) and ``s`` is the inverse softplus of ``λ``, after raising them to the floor of
    Note [Eigenvalue floor]: for any other ``A``, the factors of a rank ``r`` matrix close to
    the nearest positive semidefinite matrix of rank at most ``r``.

    Args:
        A: shape ``(*, n, n)``.
        rank: ``r``, with ``1 <= r <= n``.

    Returns:
        ``Q`` of shape ``(*, n, r)`` and ``s`` of shape ``(*, r)``. ``O(n² r)`` for an ``A``
        of rank at most ``2r`` (to rounding), ``O(n³)`` otherwise: Note [Eigenpairs of a
        symmetric matrix of low rank].
    """
    L, Q = _eigh_above_floor(A, rank)
    # eigh sorts the eigenvalues in ascending order: the largest are the last ones.
    return Q[..., -rank:], softplus_inverse(L[..., -rank:])


# Note [Eigenvalue floor]
#     Positive definite matrices (and PSD matrices of rank exactly r) form an open set: a
#     matrix with a zero or negative eigenvalue has no nearest member, and no preimage under
#     log or inverse softplus. The inverse maps therefore raise every eigenvalue of the
#     symmetric part to at least
#         floor = sqrt(eps) · max|λ|      (sqrt(eps) for the zero matrix),
#     per matrix, with eps the dtype's machine epsilon: 3.5e-4 relative in float32, 1.5e-8 in
#     float64, the membership tolerance of tether.constraints.default_atol (for float16 or
#     bfloat16 values computed on in float32, their own eps: Note [Low-precision tensors]).
#     A member moves by less than that tolerance (relative to its largest eigenvalue), and a
#     non-member lands that close to its projection onto the closed set (eigenvalues clamped
#     at zero). Relative, so that the result does not depend on the units of the matrix.


def _eigenvalue_floor(L: Tensor) -> Tensor:
    """The floor of Note [Eigenvalue floor] for eigenvalues of shape ``(*, n)``, as ``(*, 1)``."""
    atol = math.sqrt(precision_eps(L))  # the stored dtype's: Note [Low-precision tensors]
    scale = L.abs().amax(dim=-1, keepdim=True)
    return atol * torch.where(scale > 0, scale, torch.ones_like(scale))


def _eigh_above_floor(A: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of ``A``, eigenvalues raised to the floor.

    With ``rank``, only the largest ``rank`` are asked for, and a matrix of rank at most
    ``2 rank`` gets those of :func:`low_rank_eigh` (its other eigenvalues are zero to
    rounding, and the floor's ``max|λ|`` is among them).
    """
    S = symmetric_part(A)
    pairs = None if rank is None else low_rank_eigh(S, rank)
    L, Q = torch.linalg.eigh(S) if pairs is None else (pairs.values, pairs.vectors)
    return torch.maximum(L, _eigenvalue_floor(L)), Q


# Note [Eigenpairs of a symmetric matrix of low rank]
#     The PSD constraints of rank r read the r largest eigenpairs of an n x n symmetric S (to
#     assign a weight, for the distance and the rank test). A dense eigh costs O(n³). When S
#     has rank at most m = 2r, as a member has (up to its rounding), O(n² m) suffice: for a
#     Gaussian n x m matrix Ω, range(S Ω) = range(S) almost surely, so with Q an orthonormal
#     basis of it (a thin QR) S = Q T Qᴴ, T = Qᴴ S Q, and the m eigenpairs (θ, V) of T give
#     S's nonzero ones, (θ, Q V); the other n - m eigenvalues are zero (Rayleigh-Ritz on an
#     invariant subspace). That S is such a matrix is checked, not assumed: the residual
#     E = S - Q T Qᴴ is formed (n x n, the size of S), and only if
#         ‖E‖_F <= 8 √n eps ‖S‖_F     (eps of the stored dtype: Note [Low-precision tensors])
#     for every matrix of the batch, rounding, are the m pairs used; else the dense eigh runs.
#     As Qᴴ E Q = 0, ‖S - P‖_F² = ‖T - Qᴴ P Q‖_F² + ‖E‖_F² for any P on range(Q), so the
#     distance to the set computed from θ, with ‖E‖ added, bounds the true one from above
#     and differs from it by at most ‖E‖_F (Weyl). Ω comes from a generator of its own with a
#     fixed seed: the global random stream is left alone and results repeat. The nearest
#     member of a matrix of higher rank needs its r largest eigenpairs to full accuracy, for
#     which no O(n² r) method is exact: that stays a dense eigh, O(n³).
#
#     Reference: Finding Structure with Randomness: Probabilistic Algorithms for Constructing
#     Approximate Matrix Decompositions. Nathan Halko, Per-Gunnar Martinsson, Joel A. Tropp,
#     2011. https://doi.org/10.1137/090771806

_SUBSPACE_SEED = 15


class LowRankEigh(NamedTuple):
    """What :func:`low_rank_eigh` returns: ``S ≈ vectors diag(values) vectorsᴴ``."""

    values: Tensor  # (*, m), ascending
    vectors: Tensor  # (*, n, m), orthonormal columns
    residual: Tensor  # (*,), ‖S - vectors diag(values) vectorsᴴ‖_F


def low_rank_eigh(S: Tensor, rank: int) -> LowRankEigh | None:
    """The ``m = 2 rank`` eigenpairs of a symmetric ``S`` of rank at most ``m``, in ``O(n² m)``.

    ``None`` where that does not pay (``4 rank > n``), on the meta device, or where ``S`` is
    not of rank ``m`` to rounding: see Note [Eigenpairs of a symmetric matrix of low rank].

    Args:
        S: symmetric (Hermitian), shape ``(*, n, n)``.
        rank: the number of eigenpairs the caller needs, ``r``; ``2r`` are returned.

    Example:
        >>> import torch
        >>> B = torch.randn(100, 3, dtype=torch.float64)
        >>> pairs = low_rank_eigh(B @ B.T, 3)
        >>> torch.allclose(pairs.values[-3:], torch.linalg.eigvalsh(B @ B.T)[-3:])
        True
    """
    n, m = S.shape[-1], 2 * rank
    if S.is_meta or 2 * m > n or S.numel() == 0:
        return None
    generator = torch.Generator(device=S.device).manual_seed(_SUBSPACE_SEED)
    real = S.real.dtype if S.is_complex() else S.dtype
    omega = torch.randn(n, m, dtype=real, device=S.device, generator=generator).to(S.dtype)
    Q = torch.linalg.qr(S @ omega).Q
    T = Q.mH @ (S @ Q)
    values, V = torch.linalg.eigh((T + T.mH) / 2)
    vectors = Q @ V
    residual = torch.linalg.matrix_norm(
        S - (vectors * values.unsqueeze(-2).to(S.dtype)) @ vectors.mH
    )
    bound = 8 * math.sqrt(n) * precision_eps(S) * torch.linalg.matrix_norm(S)
    if not bool((residual <= bound).all()):
        return None
    return LowRankEigh(values, vectors, residual)
