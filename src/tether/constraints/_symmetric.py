"""Symmetric and skew-symmetric matrices (Hermitian and skew-Hermitian for complex tensors)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import check_square
from tether.constraints._base import Constraint, Draw, register_constraint, worst
from tether.functional import skew_part, symmetric_part

__all__ = ["Skew", "Symmetric", "skew", "symmetric"]

M = TypeVar("M", bound=nn.Module)


class _Subspace(Constraint):
    """A subspace of the square matrices, reached by its orthogonal projection (``forward``).

    The projection is its own right inverse, and the part of ``X`` it removes
    (:meth:`_complement`) measures the distance to the set. Subclasses give both projections.
    """

    _owner: str  # the registering function, which starts error messages

    @abc.abstractmethod
    def _complement(self, X: Tensor) -> Tensor:
        """The projection of ``X`` onto the orthogonal complement of the set."""

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        return self.forward(X)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """The projection of a standard Gaussian ``G``, ``(G ± Gᴴ) / 2``.

        For :class:`Symmetric`, a matrix of the Gaussian orthogonal (unitary) ensemble.
        """
        self.check_shape(shape, "the sample")
        G = torch.randn(tuple(shape), **draw.kwargs)
        return self.forward(G)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius norm of the part of ``X`` outside the set: the distance to it."""
        return worst(torch.linalg.matrix_norm(self._complement(X)))

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square(self._owner, label, shape)


class Symmetric(_Subspace):
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

    _owner = "symmetric()"

    def forward(self, X: Tensor) -> Tensor:
        # Called directly, a non-square X would broadcast against its transpose: (1, 3) -> (3, 3).
        self.check_shape(X.shape, "the input")
        return symmetric_part(X)

    def _complement(self, X: Tensor) -> Tensor:
        return skew_part(X)


class Skew(_Subspace):
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

    _owner = "skew()"

    def forward(self, X: Tensor) -> Tensor:
        # Called directly, a non-square X would broadcast against its transpose: (1, 3) -> (3, 3).
        self.check_shape(X.shape, "the input")
        return skew_part(X)

    def _complement(self, X: Tensor) -> Tensor:
        return symmetric_part(X)


def symmetric(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to symmetric (Hermitian) matrices: see :class:`Symmetric`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> W = tether.symmetric(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, W.T)
        True
    """
    return register_constraint(module, name, Symmetric())


def skew(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to skew-symmetric (skew-Hermitian) matrices: see :class:`Skew`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> W = tether.skew(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, -W.T)
        True
    """
    return register_constraint(module, name, Skew())
