"""Maps onto orthogonal and unitary matrices, and onto matrices with orthonormal columns:
the exponential, QR and the polar factor (the Cayley and Householder maps have modules of
their own)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["matrix_exp", "orthonormalize", "polar"]


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
