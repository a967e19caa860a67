"""Maps onto orthogonal and unitary matrices, and onto matrices with orthonormal columns."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cayley", "householder", "matrix_exp", "orthonormalize", "polar"]


def matrix_exp(A: Tensor) -> Tensor:
    """The matrix exponential ``exp(A)``: orthogonal (unitary) for skew (skew-Hermitian) ``A``.

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


def cayley(A: Tensor) -> Tensor:
    """The Cayley map ``(I + A/2)(I - A/2)⁻¹``: orthogonal (unitary) for skew ``A``.

    Cheaper than the exponential (one linear solve) and a good retraction near the identity;
    it never reaches orthogonal matrices with eigenvalue -1.

    Args:
        A: shape ``(*, n, n)``, skew-symmetric (skew-Hermitian) for an orthogonal result.

    Example:
        >>> import torch
        >>> from tether.functional import cayley
        >>> X = torch.randn(3, 3, dtype=torch.float64)
        >>> Q = cayley(X - X.mT)
        >>> torch.allclose(Q.mT @ Q, torch.eye(3, dtype=torch.float64))
        True
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def householder(X: Tensor) -> Tensor:
    """Orthonormal columns from the reflectors below the diagonal of a tall ``X``.

    The column ``i`` of the strictly lower triangle of ``X`` (with a 1 on the diagonal) is the
    vector ``v_i`` of the reflector ``I - 2 v vᵀ / vᵀv``; the result is the product of the
    reflectors (first ``k`` columns), with the sign of column ``i`` taken from the sign of
    ``X[i, i]`` (so that every orthogonal matrix is reached). PyTorch truncates ``X[i, i]`` to
    an integer instead, which zeroes the column when ``|X[i, i]| < 1`` (after weight decay,
    say); both agree on the ``±1`` diagonals that ``right_inverse`` produces.

    Args:
        X: real, shape ``(*, n, k)`` with ``n >= k``.
    """
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau)
    signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


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
