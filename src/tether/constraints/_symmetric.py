"""Symmetric and skew-symmetric matrices (Hermitian and skew-Hermitian for complex tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import bad_shape
from tether.constraints._base import Constraint, register_constraint
from tether.functional import skew_part, symmetric_part

__all__ = ["Skew", "Symmetric", "skew", "symmetric"]

M = TypeVar("M", bound=nn.Module)


def check_square(constraint: str, shape: Sequence[int], label: str) -> None:
    """Raise ``bad_shape`` unless ``shape`` is ``(*, n, n)``; shared by the symmetric family."""
    if len(shape) < 2 or shape[-2] != shape[-1]:
        hint = "Leading dimensions are batch dimensions; the last two must be equal."
        raise bad_shape(
            constraint,
            label,
            shape,
            "a square matrix or a batch of square matrices, shape (*, n, n)",
            hint if len(shape) >= 2 else "",
        )


def worst(distances: Tensor) -> Tensor:
    """The largest of per-matrix distances, ``0`` for an empty batch."""
    return distances.amax() if distances.numel() else distances.new_zeros(())


class Symmetric(Constraint):
    """Symmetric matrices, Hermitian for complex tensors.

    The set is ``{X : X = Xᴴ}`` of shape ``(*, n, n)``: a vector space, so the constraint is
    the orthogonal projection ``X ↦ (X + Xᴴ) / 2``. Gradients reaching the original are the
    projected (Riemannian) gradients, and ``right_inverse`` is the same projection: it sets a
    symmetric matrix exactly and replaces any other by its symmetric part, the nearest
    symmetric matrix in the Frobenius norm. The original keeps the shape of the weight.

    Choose it for quadratic forms, Hessian-like weights and undirected couplings; use
    :class:`PositiveSemidefinite` or :class:`PositiveDefinite` when the sign of the form
    matters too. Like ``geotorch.symmetric``, with the projection instead of geotorch's copy
    of the lower triangle, which scales the gradient of off-diagonal entries by two.

    Raises:
        ValueError: the tensor is not square, shape ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.symmetric(torch.nn.Linear(4, 4))
        >>> torch.equal(layer.weight, layer.weight.T)
        True
    """

    def forward(self, X: Tensor) -> Tensor:
        return symmetric_part(X)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        return symmetric_part(X)

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A matrix of the Gaussian orthogonal (unitary) ensemble: ``(G + Gᴴ) / 2``."""
        self.check_shape(shape, "sample()")
        G = torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
        return symmetric_part(G)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius norm of the skew part ``(X - Xᴴ) / 2``: the distance to the set."""
        return worst(torch.linalg.matrix_norm(skew_part(X)))

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square("symmetric()", shape, label)


class Skew(Constraint):
    """Skew-symmetric matrices, skew-Hermitian for complex tensors.

    The set is ``{X : X = -Xᴴ}`` of shape ``(*, n, n)``, the Lie algebra of the orthogonal
    (unitary) group: the projection ``X ↦ (X - Xᴴ) / 2``, with the same projection as
    ``right_inverse``, which sets a skew matrix exactly and replaces any other by its skew
    part. The original keeps the shape of the weight.

    Choose it for generators of rotations (``matrix_exp`` of a skew matrix is orthogonal),
    antisymmetric couplings and conservative dynamics (``dx/dt = A x`` keeps ``|x|``). Like
    ``geotorch.skew``, with the projection instead of a copy of the lower triangle.

    Raises:
        ValueError: the tensor is not square, shape ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.skew(torch.nn.Linear(4, 4))
        >>> torch.equal(layer.weight, -layer.weight.T)
        True
    """

    def forward(self, X: Tensor) -> Tensor:
        return skew_part(X)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        return skew_part(X)

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(G - Gᴴ) / 2`` for a standard Gaussian ``G``."""
        self.check_shape(shape, "sample()")
        G = torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
        return skew_part(G)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius norm of the symmetric part ``(X + Xᴴ) / 2``: the distance to the set."""
        return worst(torch.linalg.matrix_norm(symmetric_part(X)))

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square("skew()", shape, label)


def symmetric(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to symmetric (Hermitian) matrices: see :class:`Symmetric`.

    Example:
        >>> import torch, tether
        >>> W = tether.symmetric(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, W.T)
        True
    """
    return register_constraint(module, name, Symmetric())


def skew(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to skew-symmetric (skew-Hermitian) matrices: see :class:`Skew`.

    Example:
        >>> import torch, tether
        >>> W = tether.skew(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, -W.T)
        True
    """
    return register_constraint(module, name, Skew())
