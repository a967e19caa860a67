"""``Constraint``: what every ready-made parametrization of tether offers."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import where
from tether.parametrize import register_parametrization

__all__ = ["Constraint", "default_atol", "register_constraint"]

M = TypeVar("M", bound=nn.Module)


def default_atol(dtype: torch.dtype) -> float:
    """Membership tolerance for a dtype: the square root of its machine epsilon.

    About half the significant digits: 3.5e-4 in float32, 1.5e-8 in float64. Rounding in a
    map's forward pass stays far below it, a point off the set by a real amount does not.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def gaussian_matrix(
    shape: torch.Size,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Matrices of shape ``(*, n, k)`` with i.i.d. ``N(0, 1/k)`` entries.

    The scaling keeps the singular values of order 1 whatever the size (for square matrices,
    the Ginibre ensemble, whose eigenvalues fill the unit disk): a neutral starting point for
    samples that are then moved onto a set.
    """
    G = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    return G / math.sqrt(shape[-1])


def worst(distances: Tensor) -> Tensor:
    """The largest of per-matrix (or per-slice) distances, ``0`` for an empty batch.

    What :meth:`Constraint.distance` reports for a batch: the worst member decides membership.
    """
    return distances.amax() if distances.numel() else distances.new_zeros(())


class Constraint(nn.Module, abc.ABC):
    """Base class of tether's constraints: a parametrization onto a set of tensors.

    A constraint maps any tensor (``forward``) onto its set, and back (``right_inverse``), so
    that ``module.weight = X`` sets a member ``X`` exactly. On top of the parametrization
    protocol it offers :meth:`sample` (draw a member), :meth:`distance` (how far a tensor is
    from the set) and :meth:`in_manifold` (membership within a tolerance).

    Subclasses implement ``forward``, ``right_inverse``, ``sample`` and ``distance``, and
    override :meth:`check_shape` when the math rules out some shapes.
    """

    @abc.abstractmethod
    def forward(self, X: Tensor) -> Tensor:
        """Map an unconstrained tensor onto the set."""

    @abc.abstractmethod
    def right_inverse(self, X: Tensor) -> Tensor:
        """Return ``Y`` with ``forward(Y) == X`` for a member ``X`` (projecting a non-member)."""

    @abc.abstractmethod
    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw a member of the set of the given shape."""

    @abc.abstractmethod
    def distance(self, X: Tensor) -> Tensor:
        """How far ``X`` is from the set: a non-negative scalar (the worst over a batch)."""

    def check_shape(self, shape: torch.Size, label: str) -> None:
        """Raise a ``ValueError`` naming ``label`` if the set has no member of this shape."""

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """Whether ``X`` is in the set, up to ``atol`` (default: :func:`default_atol`)."""
        try:
            self.check_shape(X.shape, "X")
        except ValueError:
            return False
        tolerance = default_atol(X.dtype) if atol is None else atol
        return bool(self.distance(X) <= tolerance)


def register_constraint(module: M, name: str, constraint: Constraint) -> M:
    """Check that ``module.<name>`` has a shape the constraint allows, then register it."""
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor):
        constraint.check_shape(tensor.shape, where(module, name))
    return register_parametrization(module, name, constraint)
