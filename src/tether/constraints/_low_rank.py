"""Matrices of bounded or fixed rank, kept in factored form: ``LowRank`` and ``FixedRank``."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tether._checks import bad_shape, bad_type, bad_value, required_rank
from tether.constraints._base import Constraint, Draw, gaussian_matrix, register_constraint
from tether.functional import factored, orthonormalize, softplus_inverse, truncated_svd
from tether.functional._precision import upcast

__all__ = ["FixedRank", "LowRank", "fixed_rank", "low_rank"]

# geotorch's names for the map onto the singular values that tether offers too.
_FIXED_RANK_MAPS = ("softplus",)

M = TypeVar("M", bound=nn.Module)

# Note [Factored constraints]
#     LowRank, FixedRank and AlmostOrthogonal are sets defined by the singular values alone,
#     so they share one map, U diag(g(s)) Vᵀ, with U = orthonormalize(A) of shape (*, n, r),
#     V = orthonormalize(B) of shape (*, k, r) and g a map onto the allowed singular values
#     (the identity, eps + softplus, 1 + lam·sin). Forward costs O((n + k) r²) for the two
#     QRs and O(n k r) for the product. right_inverse is the truncated SVD with g's inverse
#     on the singular values: orthonormalize leaves orthonormal columns as they are, so a
#     member comes back exactly. For a non-member it first clamps the singular values onto
#     the allowed ones; as the sets are invariant under X ↦ P X Q with P, Q orthogonal, this
#     gives the nearest member in the Frobenius norm (Eckart-Young for the rank; von Neumann's
#     trace inequality in general), and distance() is that Frobenius distance.
#
#     The constraints take three originals: the state_dict holds
#     parametrizations.<name>.original0 (A, shape (*, n, r)), original1 (s, shape (*, r)) and
#     original2 (B, shape (*, k, r)), (n + k + 1) r numbers instead of n k. As with any
#     parametrization whose right_inverse returns several tensors, the constraint must come
#     first in a chain, and the originals are new Parameters: build the optimizer after
#     registering.


class _Factored(Constraint):
    """``U diag(g(s)) Vᵀ``: see Note [Factored constraints]. Subclasses choose ``r`` and ``g``."""

    _owner: str  # the registering function, which starts error messages

    @abc.abstractmethod
    def _rank(self, shape: Sequence[int]) -> int:
        """``r`` for matrices of this shape."""

    @abc.abstractmethod
    def _values(self, s: Tensor) -> Tensor:
        """``g``: the singular values that the original ``s`` stands for."""

    @abc.abstractmethod
    def _originals(self, sigma: Tensor) -> Tensor:
        """The right inverse of ``g``, allowed singular values first clamped onto its image."""

    @abc.abstractmethod
    def _excess(self, sigma: Tensor) -> Tensor:
        """How far each of the decreasing singular values ``sigma`` is from its allowed range."""

    def forward(self, A: Tensor, s: Tensor, B: Tensor) -> Tensor:  # type: ignore[override]  # three originals
        return factored(orthonormalize(A), self._values(s), orthonormalize(B))

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]  # three originals
        self.check_shape(X.shape, "the assigned value")
        U, sigma, V = truncated_svd(X, self._rank(X.shape))
        return U, self._originals(sigma), V

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius distance to the set (the worst over a batch)."""
        if X.numel() == 0:
            return X.new_zeros(())
        excess = self._excess(torch.linalg.svdvals(X))
        return torch.linalg.vector_norm(excess, dim=-1).amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        if len(shape) < 2:
            raise bad_shape(self._owner, label, shape, "a matrix or a batch of matrices")


class LowRank(_Factored):
    """Matrices of rank at most ``r``, stored as their factors ``U diag(s) Vᵀ``.

    The set is ``{X : rank X <= r}`` for weights of shape ``(*, n, k)``, tall, wide or square,
    with ``1 <= r <= min(n, k)``. ``U`` (``n x r``) and ``V`` (``k x r``) have orthonormal
    columns (:func:`tether.functional.orthonormalize` of the originals) and ``s`` holds ``r``
    real numbers, of any sign; training works on the factors, ``(n + k + 1) r`` numbers, and
    forward costs ``O(n k r)``. Choose it to compress a layer or regularise it by rank; choose
    :class:`FixedRank` when the rank must not drop (for example to keep a pseudo-inverse
    well defined).

    Registration keeps a weight of rank at most ``r`` (the truncated SVD reproduces it) and
    replaces any other by its best approximation of rank ``r`` (Eckart-Young). The
    ``state_dict`` holds ``original0`` (``U``'s original, ``(*, n, r)``), ``original1``
    (``s``, ``(*, r)``) and ``original2`` (``V``'s original, ``(*, k, r)``); see Note
    [Factored constraints] in the source. Samples are the best rank ``r`` approximation of a
    matrix with i.i.d. ``N(0, 1/k)`` entries.

    Args:
        rank: ``r``, a positive int; at registration it must not exceed ``min(n, k)``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``rank`` is not an int.
        ValueError: ``rank < 1``; or, at registration, the tensor is not a matrix or
            ``rank > min(n, k)``.

    References:
        The approximation of one matrix by another of lower rank. Carl Eckart, Gale Young,
        1936. https://doi.org/10.1007/BF02288367

    Example:
        >>> import torch, tether
        >>> layer = tether.low_rank(torch.nn.Linear(6, 4), rank=2)
        >>> int(torch.linalg.matrix_rank(layer.weight))
        2
        >>> sorted(name for name, _ in layer.parametrizations.weight.named_parameters())
        ['original0', 'original1', 'original2']
    """

    _owner = "low_rank()"

    def __init__(self, rank: int, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self.rank = _rank_argument(rank, self._owner)

    def _rank(self, shape: Sequence[int]) -> int:
        return self.rank

    def _values(self, s: Tensor) -> Tensor:
        return s

    def _originals(self, sigma: Tensor) -> Tensor:
        return sigma

    def _excess(self, sigma: Tensor) -> Tensor:
        return sigma[..., self.rank :]

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """The best rank ``r`` approximation of a matrix with i.i.d. ``N(0, 1/k)`` entries."""
        shape = torch.Size(shape)
        self.check_shape(shape, "the sample")
        G = gaussian_matrix(shape, draw)
        with torch.no_grad():
            return self(*self.right_inverse(G))

    def check_shape(self, shape: torch.Size, label: str) -> None:
        super().check_shape(shape, label)
        _check_rank_fits(self._owner, label, shape, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class FixedRank(LowRank):
    """Matrices of rank exactly ``r``: ``U diag(s) Vᵀ`` with singular values ``s > eps``.

    The set is ``{X : rank X = r}`` for weights of shape ``(*, n, k)``, with
    ``1 <= r <= min(n, k)``; more precisely the map reaches the matrices of rank ``r`` whose
    ``r`` nonzero singular values exceed ``eps``: ``s = eps + softplus(original1)``, so the
    rank cannot drop numerically, however far training pushes the original. Choose it over
    :class:`LowRank` when a zero singular value would break something downstream (an inverse
    or pseudo-inverse, a log-determinant on the range); otherwise :class:`LowRank` trains with
    fewer saturating directions.

    Registration keeps a member as it is and replaces any other matrix by the nearest member
    with singular values at least ``eps``: its truncated SVD, singular values below ``eps``
    raised to it. The ``state_dict`` layout is :class:`LowRank`'s. The set is open, so the
    membership test with a tolerance accepts matrices within it of a rank ``r`` matrix:
    :meth:`distance` is the Frobenius distance to the members with singular values at least
    ``eps``, and :meth:`in_manifold` also asks for numerical rank ``r``: the ``r``-th
    singular value above ``max(n, k) · eps(dtype)`` times the largest, the threshold of
    ``torch.linalg.matrix_rank``. Samples are :class:`LowRank`'s, singular values raised to
    ``eps`` (almost surely a no-op).

    Args:
        rank: ``r``, a positive int; at registration it must not exceed ``min(n, k)``.
        f: the map onto the singular values, as geotorch's ``f``: only ``"softplus"``
            (``eps + softplus``, geotorch's default) is offered.
        eps: the floor of the singular values, positive (default ``1e-6``, as geotorch).
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``rank`` is not an int, or ``eps`` not a real number.
        ValueError: ``rank < 1``, ``eps <= 0`` or ``f`` is not ``"softplus"``; or, at
            registration, the tensor is not a matrix or ``rank > min(n, k)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.fixed_rank(torch.nn.Linear(5, 5, bias=False), rank=3)
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original1.fill_(-50.0)  # softplus(-50) ~ 0
        >>> int(torch.linalg.matrix_rank(layer.weight))  # singular values stay at eps
        3
    """

    _owner = "fixed_rank()"

    def __init__(
        self,
        rank: int,
        f: str = "softplus",
        *,
        eps: float = 1e-6,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(rank, size=size)
        if not (isinstance(f, str) and f in _FIXED_RANK_MAPS):
            raise ValueError(
                f"{self._owner}: `f` must be 'softplus' (eps + softplus on the singular "
                f"values, geotorch's default); got {f!r}. tether offers no other map: other "
                "maps onto (0, inf), callables included, are not supported."
            )
        self.f = f
        self.eps = _positive_float(eps, "eps", self._owner)

    def _values(self, s: Tensor) -> Tensor:
        return self.eps + F.softplus(s)

    def _originals(self, sigma: Tensor) -> Tensor:
        # The floor is reached only in the limit: the smallest positive excess stands for it.
        tiny = torch.finfo(sigma.dtype).tiny
        return softplus_inverse((sigma - self.eps).clamp_min(tiny))

    def _excess(self, sigma: Tensor) -> Tensor:
        leading = (self.eps - sigma[..., : self.rank]).clamp_min(0)
        return torch.cat([leading, sigma[..., self.rank :]], dim=-1)

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """``distance(X) <= atol`` and numerical rank ``r`` (see :func:`has_numerical_rank`)."""
        return super().in_manifold(X, atol) and has_numerical_rank(X, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, eps={self.eps}"


def low_rank(module: M, name: str = "weight", rank: int | None = None) -> M:
    """Constrain ``module.<name>`` to rank at most ``rank``, in factored form (:class:`LowRank`).

    ``rank`` is required; it may be passed by position, as geotorch's
    ``low_rank(module, "weight", 2)``.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a matrix or batch of matrices ``(*, n, k)``.
        rank: the largest rank allowed, ``1 <= rank <= min(n, k)``.

    Returns:
        ``module``.

    Raises:
        TypeError: ``rank`` is missing or not an int.
        ValueError: ``rank < 1``, the tensor is not a matrix (or batch of matrices), or
            ``rank`` exceeds ``min(n, k)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.low_rank(torch.nn.Linear(8, 3), rank=1)
        >>> int(torch.linalg.matrix_rank(layer.weight))
        1
    """
    return register_constraint(module, name, LowRank(required_rank(rank, "low_rank")))


def fixed_rank(
    module: M,
    name: str = "weight",
    rank: int | None = None,
    f: str = "softplus",
    *,
    eps: float = 1e-6,
) -> M:
    """Constrain ``module.<name>`` to rank exactly ``rank`` (:class:`FixedRank`).

    ``rank`` is required; it and ``f`` may be passed by position, as geotorch's
    ``fixed_rank(module, "weight", 2)``.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a matrix or batch of matrices ``(*, n, k)``.
        rank: the rank, ``1 <= rank <= min(n, k)``.
        f: the map onto the singular values: ``"softplus"`` (``eps + softplus``), the only
            one offered (geotorch's default).
        eps: the floor of the singular values, positive.

    Returns:
        ``module``.

    Raises:
        TypeError: ``rank`` is missing or not an int, or ``eps`` not a real number.
        ValueError: ``rank < 1``, ``eps <= 0``, ``f`` is not ``"softplus"``, the tensor is
            not a matrix (or batch of matrices), or ``rank`` exceeds ``min(n, k)``.

    Example:
        >>> import torch, tether
        >>> layer = tether.fixed_rank(torch.nn.Linear(4, 6), rank=4)
        >>> int(torch.linalg.matrix_rank(layer.weight))
        4
    """
    return register_constraint(
        module, name, FixedRank(required_rank(rank, "fixed_rank"), f, eps=eps)
    )


def has_numerical_rank(X: Tensor, rank: int) -> bool:
    """Whether every matrix of ``X`` has ``rank`` singular values above the rounding level.

    The level is ``max(n, k) · eps`` times the largest singular value, the threshold of
    ``torch.linalg.matrix_rank``.
    """
    if X.numel() == 0:
        return True
    # In the compute dtype, with the threshold of the stored one: Note [Low-precision tensors].
    sigma = torch.linalg.svdvals(upcast(X))
    threshold = max(X.shape[-2:]) * torch.finfo(X.dtype).eps * sigma[..., :1]
    return bool((sigma[..., rank - 1 : rank] > threshold).all())


def _rank_argument(rank: object, owner: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise bad_type(owner, "rank", "a positive int", rank)
    if rank < 1:
        raise bad_value(owner, "rank", "a positive int", rank)
    return rank


def _positive_float(value: object, argument: str, owner: str) -> float:
    # Unlike _checks.positive_number, one message for 0 and inf alike ("positive and finite").
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(owner, argument, "a real number", value)
    if not (math.isfinite(value) and value > 0):
        raise bad_value(owner, argument, "positive and finite", value)
    return float(value)


def _check_rank_fits(owner: str, label: str, shape: Sequence[int], rank: int) -> None:
    if rank > min(shape[-2:]):
        raise bad_shape(
            owner,
            label,
            shape,
            f"both matrix dimensions at least rank={rank}",
            f"Use rank <= {min(shape[-2:])} for this shape.",
        )
