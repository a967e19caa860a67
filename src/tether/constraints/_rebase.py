"""Orthogonal matrices expressed against a given base point: what ``update_base(averaged=)`` needs.

``tether.orthogonal`` with a base computes ``base @ map(A)``; see Note [An averaged copy and
update_base] for why an averaged copy needs the inverse of ``map``: for the exponential a
logarithm, for the Cayley map its inverse, each near the identity. Householder's inverse is
the constraint's own right inverse (without a base).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from tether.functional import cayley, orthonormalize, skew_matrix_exp
from tether.functional._precision import precision_eps

__all__ = [
    "averaged_module",
    "cayley_inverse",
    "columns_generator",
    "original_against",
    "original_of",
    "skew_log",
]

# Note [An averaged copy and update_base]
#     torch.optim.swa_utils.AveragedModel averages parameters: for a weight ``base @ map(A)``
#     it averages the originals ``A``, which stays on the set whatever the average is. That
#     holds only while the model and the copy share the base: ``update_base`` gives the model
#     a new base ``B'`` (its current weight) and the neutral original, and the copy, still
#     on the old base, then averages originals written against two bases, so its weight
#     jumps. The alternatives are wrong: averaging the bases too (``use_buffers=True``)
#     leaves a matrix that is not orthogonal; re-basing the copy on its own weight keeps two
#     bases, so that once the model stops moving the average converges to ``B_copy @ map(A)``
#     instead of the model's ``B' @ map(A)``, an offset that never goes away. What works is
#     to give the copy the model's new base and the original ``A'`` with
#     ``B' @ map(A') = W_copy``: its weight does not move, both average against one base
#     again, and once the model stops, ``A'`` converges to its original and the copy to its
#     weight. ``A'`` takes the inverse of ``map`` near the identity (``B'ᴴ W_copy`` is close
#     to it when the copy follows the model): the logarithm for ``matrix_exp``, the inverse
#     Cayley map, the QR-based right inverse for ``householder``; for tall weights with the
#     first two, ``columns_generator``, through 2k x 2k blocks when n >= 2k (Note [The Stiefel
#     logarithm through 2k x 2k blocks]). A Grassmannian weight moves only across subspaces,
#     so ``B'ᴴ W_copy`` is generally out of its map's reach: not supported.

# Note [The Stiefel logarithm through 2k x 2k blocks]
#     A tall generator S = [[A, -Bᴴ], [B, 0]] (n x n) with B = Q_B R (a thin QR, n - k >= k)
#     is J S₂ Jᴴ with J = diag(I, Q_B), which has orthonormal columns, and S₂ =
#     [[A, -Rᴴ], [R, 0]] (2k x 2k); S vanishes off the range of J, so f(S) E = J f(S₂) E for
#     every analytic f (E = [I; 0]), the exponential and the Cayley map among them
#     (Edelman, Arias, Smith 1998). Conversely, to find S with f(S) E = Y = [M; N], take the
#     thin QR N = Q_N R_N and the 2k x k matrix Y₂ = [M; R_N] (orthonormal columns, as Y's):
#     a zero-corner S₂ with f(S₂) E = Y₂ gives S = J S₂ Jᴴ (J = diag(I, Q_N)) with
#     f(S) E = J Y₂ = Y, and its original is S₂'s with the bottom block multiplied by Q_N.
#     columns_generator then completes and iterates on 2k x 2k matrices: O(n k²) in all,
#     where completing Y itself would cost O(n³).


def _half_cayley(Q: Tensor) -> Tensor | None:
    """``(I + Q)⁻¹ (Q - I)``, skew for an orthogonal ``Q``; ``None`` if ``Q`` has eigenvalue -1."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    C, info = torch.linalg.solve_ex(eye + Q, Q - eye)
    if bool((info != 0).any()) or not bool(C.isfinite().all()):
        return None
    return (C - C.mH) / 2  # skew to rounding; make it exactly so


def cayley_inverse(Q: Tensor) -> Tensor | None:
    """The skew ``A`` with ``cayley(A) = Q``: ``2 (I + Q)⁻¹ (Q - I)``.

    ``None`` where there is none, for a ``Q`` with eigenvalue -1 (the Cayley map never
    reaches those).

    Example:
        >>> import torch
        >>> from tether.functional import cayley
        >>> A = torch.tensor([[0.0, -0.5], [0.5, 0.0]])
        >>> torch.allclose(cayley_inverse(cayley(A)), A)
        True
    """
    C = _half_cayley(Q)
    return None if C is None else 2 * C


def skew_log(Q: Tensor) -> Tensor | None:
    """The principal logarithm of an orthogonal (unitary) ``Q``: skew, with ``exp(S) = Q``.

    With ``Q = V diag(exp(iθ)) Vᴴ``, ``C = (I + Q)⁻¹ (Q - I) = V diag(i tan(θ/2)) Vᴴ``:
    the Hermitian ``i C`` has the unitary eigenvectors ``V`` (an eigendecomposition that stays
    accurate when eigenvalues cluster, as they do near the identity) and the eigenvalues
    ``-tan(θ/2)``, from which ``θ`` in ``(-π, π)`` follows. ``None`` for a ``Q`` with
    eigenvalue -1, whose logarithm is not unique.

    Example:
        >>> import torch
        >>> S = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> torch.allclose(skew_log(torch.linalg.matrix_exp(S)), S)
        True
    """
    C = _half_cayley(Q)
    if C is None:
        return None
    complex_dtype = C.dtype if C.is_complex() else C.dtype.to_complex()
    tangents, V = torch.linalg.eigh(1j * C.to(complex_dtype))
    angles = -2 * torch.atan(tangents)
    S = (V * (1j * angles).unsqueeze(-2)) @ V.mH
    return S if Q.is_complex() else S.real


def columns_generator(
    Y: Tensor,
    inverse: Callable[[Tensor], Tensor | None],
    group_map: Callable[[Tensor], Tensor],
    tolerance: float,
    max_iterations: int = 100,
) -> Tensor | None:
    """A skew ``S`` of shape ``(*, n, n)``, zero in its last ``n - k`` rows and columns'
    corner block, with ``group_map(S)[..., :k] == Y`` for ``Y`` of shape ``(*, n, k)``.

    The generators of tall orthogonal weights have that zero corner (``_lower``),
    so a tall ``Y`` needs more than ``inverse``: the columns that complete ``Y`` to a square
    matrix are turned until ``inverse`` of the completion has a zero corner, the iteration
    of Zimmermann (2017) for the Stiefel logarithm, here for any ``group_map`` whose
    ``inverse`` is given. Each step shrinks the corner by a factor of about ``|S|``, so a
    ``Y`` near ``[I; 0]`` takes a few steps; it stops at rounding. For a square ``Y`` it is
    ``inverse(Y)``. ``None`` if ``inverse`` has no answer or the corner stays above
    ``tolerance``.

    References:
        A matrix-algebraic algorithm for the Riemannian logarithm on the Stiefel manifold
        under the canonical metric. Ralf Zimmermann, 2017. https://arxiv.org/abs/1604.05054
    """
    n, k = Y.shape[-2], Y.shape[-1]
    if n == k:
        return inverse(Y)
    # Completed by [0; I]: for Y near [I; 0] the completion is near the identity, where the
    # inverse map is well conditioned.
    eye = torch.eye(n, dtype=Y.dtype, device=Y.device).expand(*Y.shape[:-2], n, n)
    Q = orthonormalize(torch.cat([Y, eye[..., k:]], dim=-1))
    Q = torch.cat([Y, Q[..., k:]], dim=-1)
    best: tuple[float, Tensor] | None = None
    for _ in range(max_iterations):
        S = inverse(Q)
        if S is None:
            return None
        corner = S[..., k:, k:]
        size = float(corner.abs().max())
        # Down to rounding, until the corner stops shrinking (then rounding is all it is).
        if best is not None and size > best[0] / 2:
            break
        best = (size, S)
        if size <= precision_eps(S):
            break
        Q = torch.cat([Q[..., :k], Q[..., k:] @ group_map(-corner)], dim=-1)
    if best is None or best[0] > tolerance:
        return None
    return best[1]


def original_of(S: Tensor, k: int) -> Tensor:
    """The original of shape ``(*, n, k)`` whose tall generator is ``S`` (see ``_lower``).

    The generator reads the lower triangle of the original, and of its diagonal only the
    imaginary part; the entries it ignores get the neutral point's values (``-1`` on the
    diagonal, ``0`` above it), as ``update_base`` leaves them in the model.
    """
    X = S[..., :k].tril(-1)
    diagonal = X.diagonal(dim1=-2, dim2=-1)
    diagonal.fill_(-1.0)
    if S.is_complex():
        diagonal.add_(0.5j * S[..., :k, :k].diagonal(dim1=-2, dim2=-1).imag)
    return X


def averaged_module(averaged: nn.Module) -> nn.Module:
    """The averaged copy itself: ``averaged.module`` for an ``AveragedModel``."""
    return averaged.module if isinstance(averaged, AveragedModel) else averaged


def original_against(
    Y: Tensor,
    orthogonal_map: str,
    householder_inverse: Callable[[Tensor], Tensor],
) -> Tensor | None:
    """The tall original ``A`` with ``map(A) == Y``, for ``Y`` tall with orthonormal columns.

    ``Y`` is the weight in the coordinates of the base point (``baseᴴ Q``, or its compact
    form: ``Orthogonal.coordinates``), so that ``base @ map(A)`` is the weight.
    ``householder_inverse`` is the right inverse of the Householder map. ``None`` where there
    is no such ``A`` near the neutral point (``Y`` too far from ``[I; 0]``): see Note [An
    averaged copy and update_base]. ``O(n k²)`` for ``n >= 2k`` (Note [The Stiefel logarithm
    through 2k x 2k blocks]), ``O(n³)`` below, where that is ``O(k³)``.
    """
    if orthogonal_map == "householder":
        return householder_inverse(Y)
    inverse, group_map = (
        (skew_log, skew_matrix_exp) if orthogonal_map == "matrix_exp" else (cayley_inverse, cayley)
    )
    n, k = Y.shape[-2], Y.shape[-1]
    tolerance = 10 * n * precision_eps(Y)
    if n < 2 * k:
        S = columns_generator(Y, inverse, group_map, tolerance)
        return None if S is None else original_of(S, k)
    Q_N, R_N = torch.linalg.qr(Y[..., k:, :])
    S = columns_generator(torch.cat([Y[..., :k, :], R_N], dim=-2), inverse, group_map, tolerance)
    if S is None:
        return None
    small = original_of(S, k)
    return torch.cat([small[..., :k, :], Q_N @ small[..., k:, :]], dim=-2)
