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
    With ``lower`` set, ``forward`` first copies one strict triangle of ``X`` onto the other
    (:meth:`_from_triangle`), so that only that triangle and the diagonal are used, as in
    geotorch.
    """

    _owner: str  # the registering function, which starts error messages

    def __init__(self, lower: bool | None = None, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        if lower not in (None, True, False):
            raise TypeError(
                f"{self._owner} takes lower=None (the projection), True (the lower triangle) "
                f"or False (the upper one); got {lower!r}."
            )
        self.lower = lower

    @abc.abstractmethod
    def _project(self, X: Tensor) -> Tensor:
        """The orthogonal projection of ``X`` onto the set."""

    @abc.abstractmethod
    def _complement(self, X: Tensor) -> Tensor:
        """The projection of ``X`` onto the orthogonal complement of the set."""

    def forward(self, X: Tensor) -> Tensor:
        # Called directly, a non-square X would broadcast against its transpose: (1, 3) -> (3, 3).
        self.check_shape(X.shape, "the input")
        return self._project(X if self.lower is None else self._from_triangle(X))

    def _from_triangle(self, X: Tensor) -> Tensor:
        """``X``'s chosen strict triangle doubled, its diagonal kept, the other triangle zero.

        Its projection is that triangle mirrored (conjugated) onto the other, with the real
        (symmetric) or imaginary (skew) part of the diagonal.
        """
        if self.lower:
            return X.tril() + X.tril(-1)
        return X.triu() + X.triu(1)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        member = self._project(X)
        if self.lower is None:
            return member
        return member.tril() if self.lower else member.triu()

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """The projection of a standard Gaussian ``G``, ``(G ± Gᴴ) / 2``.

        For :class:`Symmetric`, a matrix of the Gaussian orthogonal (unitary) ensemble.
        """
        self.check_shape(shape, "the sample")
        G = torch.randn(tuple(shape), **draw.kwargs)
        return self._project(G)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius norm of the part of ``X`` outside the set: the distance to it."""
        return worst(torch.linalg.matrix_norm(self._complement(X)))

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square(self._owner, label, shape)

    def extra_repr(self) -> str:
        return "" if self.lower is None else f"lower={self.lower}"


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
    of the lower triangle, which scales the gradient of off-diagonal entries by two. For
    geotorch's map, pass ``lower=True`` (geotorch's default): the weight is the original's
    lower triangle and diagonal mirrored, and ``right_inverse`` stores the lower triangle of
    the projection (zeros above).

    Args:
        lower: ``None`` (the default) for the projection, which uses both triangles;
            ``True`` to build the matrix from the lower triangle, ``False`` from the upper.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: the tensor is not square, shape ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.symmetric(torch.nn.Linear(4, 4))
        >>> torch.equal(layer.weight, layer.weight.T)
        True
    """

    _owner = "symmetric()"

    def _project(self, X: Tensor) -> Tensor:
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
    ``geotorch.skew``, with the projection instead of a copy of the lower triangle; pass
    ``lower=True`` (geotorch's default) for ``L - Lᴴ``, ``L`` the original's strict lower
    triangle (the imaginary part of the diagonal kept for complex tensors).

    Args:
        lower: ``None`` (the default) for the projection, which uses both triangles;
            ``True`` to build the matrix from the lower triangle, ``False`` from the upper.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: the tensor is not square, shape ``(*, n, n)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.skew(torch.nn.Linear(4, 4))
        >>> torch.equal(layer.weight, -layer.weight.T)
        True
    """

    _owner = "skew()"

    def _project(self, X: Tensor) -> Tensor:
        return skew_part(X)

    def _complement(self, X: Tensor) -> Tensor:
        return symmetric_part(X)


def symmetric(module: M, name: str = "weight", *, lower: bool | None = None) -> M:
    """Constrain ``module.<name>`` to symmetric (Hermitian) matrices: see :class:`Symmetric`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.
        lower: ``None`` (the default) for the projection; ``True`` (geotorch's default) to
            build the matrix from the lower triangle, ``False`` from the upper one.

    Example:
        >>> import torch, tether
        >>> W = tether.symmetric(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, W.T)
        True
    """
    return register_constraint(module, name, Symmetric(lower))


def skew(module: M, name: str = "weight", *, lower: bool | None = None) -> M:
    """Constrain ``module.<name>`` to skew-symmetric (skew-Hermitian) matrices: see :class:`Skew`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.
        lower: ``None`` (the default) for the projection; ``True`` (geotorch's default) to
            build the matrix from the lower triangle, ``False`` from the upper one.

    Example:
        >>> import torch, tether
        >>> W = tether.skew(torch.nn.Linear(3, 3)).weight
        >>> torch.equal(W, -W.T)
        True
    """
    return register_constraint(module, name, Skew(lower))
