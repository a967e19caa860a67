"""Entrywise constraints (``Positive``, ``Bounded``) and the probability simplex (``Simplex``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tether._checks import check_slices, choice, int_dim, real_number
from tether.constraints._base import Constraint, Draw, default_atol, register_constraint
from tether.functional._elementwise import project_simplex, softplus_inverse

__all__ = ["Bounded", "Positive", "Simplex", "bounded", "positive", "simplex"]

M = TypeVar("M", bound=nn.Module)
Map = Callable[[Tensor], Tensor]

# One (forward, right inverse) pair per option of Positive, chosen once at construction.
_POSITIVE_MAPS: dict[str, tuple[Map, Map]] = {
    "softplus": (F.softplus, softplus_inverse),
    "exp": (torch.exp, torch.log),
}


class Positive(Constraint):
    """Tensors with positive entries: ``{X : X_i > 0 for every entry i}``, any shape.

    ``map="softplus"`` (``log(1 + eˣ)``) grows linearly, so gradients keep their scale and
    large values train as fast as small ones: the default. ``map="exp"`` makes steps relative
    (a step changes ``log X``), which suits scales and rates that span orders of magnitude,
    but can overflow. The right inverses are ``softplus_inverse`` (stable for large values)
    and ``log``.

    Zero and negative entries have no nearest positive value: ``right_inverse`` raises them
    to the floor ``√eps`` of the dtype (3.5e-4 in float32, 1.5e-8 in float64), within the
    membership tolerance of 0 yet far enough from it that gradients still flow. Sampling
    applies the map to standard normal entries (log-normal for ``"exp"``).

    Args:
        map: ``"softplus"`` or ``"exp"``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``map`` is not a string.
        ValueError: ``map`` is not one of the two.

    Example:
        >>> import torch, tether
        >>> layer = tether.positive(torch.nn.Linear(3, 2))
        >>> bool((layer.weight > 0).all())
        True
    """

    supports_complex = False

    def __init__(
        self, map: Literal["softplus", "exp"] = "softplus", *, size: Sequence[int] | None = None
    ) -> None:
        super().__init__(size=size)
        self.map = choice(map, "map", tuple(_POSITIVE_MAPS), "positive()")
        self._map, self._inverse = _POSITIVE_MAPS[self.map]

    def forward(self, X: Tensor) -> Tensor:
        return self._map(X)

    def right_inverse(self, X: Tensor) -> Tensor:
        return self._inverse(torch.where(X > 0, X, default_atol(X.dtype)))

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        self.check_shape(torch.Size(shape), "the sample")
        return self._map(torch.randn(shape, **draw.kwargs))

    def distance(self, X: Tensor) -> Tensor:
        return (-X).clamp_min(0).amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_slices("positive()", label, shape, None)

    def extra_repr(self) -> str:
        return f"map={self.map!r}"


class Bounded(Constraint):
    """Tensors with entries in an interval: ``{X : low <= X_i <= high for every entry i}``.

    The map ``low + (high - low) · sigmoid(X)`` reaches the open interval ``(low, high)``
    (entries may round onto an end when the original is large); its right inverse is the
    logit of ``(X - low) / (high - low)``. For one-sided bounds use :class:`Positive` (shifted
    or scaled by a chain) instead. Entries outside the open interval, the ends included, are
    clamped to a fraction ``√eps`` of the width inside it (3.5e-4 in float32, 1.5e-8 in
    float64). Samples are uniform on the interval.

    Args:
        low: the lower end, a finite number.
        high: the upper end, a finite number above ``low``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``low`` or ``high`` is not a real number.
        ValueError: ``low`` or ``high`` is not finite, or ``low >= high``.

    Example:
        >>> import torch, tether
        >>> layer = tether.bounded(torch.nn.Linear(3, 2), low=-0.1, high=0.1)
        >>> bool((layer.weight.abs() < 0.1).all())
        True
    """

    supports_complex = False

    def __init__(self, low: float, high: float, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self.low = real_number(low, "low", "bounded()")
        self.high = real_number(high, "high", "bounded()")
        if not self.low < self.high:
            raise ValueError(
                f"bounded() needs `low` < `high`; got low={self.low!r}, high={self.high!r}. "
                "Swap them, or widen the interval."
            )

    def forward(self, X: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(X)

    def right_inverse(self, X: Tensor) -> Tensor:
        t = (X - self.low) / (self.high - self.low)
        margin = default_atol(X.dtype)
        # Inside (0, 1) we keep t as it is, so members come back exactly; the logit of the
        # ends is infinite, so they and non-members go to the margin.
        t = torch.where((t > 0) & (t < 1), t, t.clamp(margin, 1 - margin))
        return torch.logit(t)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        self.check_shape(torch.Size(shape), "the sample")
        U = torch.rand(shape, **draw.kwargs)
        return self.low + (self.high - self.low) * U

    def distance(self, X: Tensor) -> Tensor:
        return torch.maximum(self.low - X, X - self.high).clamp_min(0).amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_slices("bounded()", label, shape, None)

    def extra_repr(self) -> str:
        return f"low={self.low!r}, high={self.high!r}"


class Simplex(Constraint):
    """Probability vectors along ``dim``: ``{X : X ≥ 0, Σ_dim X = 1}``, slice by slice.

    The map is ``softmax`` along ``dim``, which reaches the open simplex (all entries
    positive); its right inverse is ``log``, exact up to softmax's invariance to adding a
    constant to a slice. Entries that are exactly 0 (or below the dtype's eps) are raised to
    eps before the log, which changes a member by a few eps and leaves that entry a small but
    nonzero gradient. Non-members are first sent to their Euclidean projection onto the
    simplex (:func:`tether.functional.project_simplex`). Samples are uniform on the simplex
    (Dirichlet(1), as normalized exponentials).

    Use it for mixture weights, attention-like rows or stochastic matrices (``dim=-1``
    on a ``Linear`` weight makes each row a distribution over the inputs).

    Args:
        dim: the dimension along which slices sum to 1.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``dim`` is not an int.

    Example:
        >>> import torch, tether
        >>> layer = tether.simplex(torch.nn.Linear(4, 3), dim=-1)
        >>> torch.allclose(layer.weight.sum(dim=-1), torch.ones(3))
        True
    """

    supports_complex = False

    def __init__(self, dim: int = -1, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self.dim = int_dim(dim, "simplex()")

    def forward(self, X: Tensor) -> Tensor:
        return torch.softmax(X, dim=self.dim)

    def right_inverse(self, X: Tensor) -> Tensor:
        P = project_simplex(X, self.dim)
        return P.clamp_min(torch.finfo(X.dtype).eps).log()

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        self.check_shape(torch.Size(shape), "the sample")
        E = torch.empty(shape, dtype=draw.dtype, device=draw.device)
        E.exponential_(generator=draw.generator)
        return E / E.sum(dim=self.dim, keepdim=True)

    def distance(self, X: Tensor) -> Tensor:
        return torch.linalg.vector_norm(X - project_simplex(X, self.dim), dim=self.dim).amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        scalar_hint = "A probability vector has at least one dimension."
        check_slices(f"simplex(dim={self.dim})", label, shape, self.dim, scalar_hint)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def positive(module: M, name: str = "weight", *, map: Literal["softplus", "exp"] = "softplus") -> M:
    """Constrain ``module.<name>`` to positive entries (see :class:`Positive`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        map: ``"softplus"`` (default) or ``"exp"``, applied entrywise.

    Example:
        >>> import torch, tether
        >>> norm = tether.positive(torch.nn.LayerNorm(4), map="exp")
        >>> bool((norm.weight > 0).all())
        True
    """
    return register_constraint(module, name, Positive(map))


def bounded(module: M, name: str = "weight", *, low: float, high: float) -> M:
    """Constrain the entries of ``module.<name>`` to ``[low, high]`` (see :class:`Bounded`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        low: the lower bound, a real number below ``high``.
        high: the upper bound.
    """
    return register_constraint(module, name, Bounded(low, high))


def simplex(module: M, name: str = "weight", dim: int = -1) -> M:
    """Make each slice of ``module.<name>`` along ``dim`` sum to 1, entries >= 0 (:class:`Simplex`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        dim: the dimension along which each slice sums to 1.

    Example:
        >>> import torch, tether
        >>> mix = tether.simplex(torch.nn.Linear(3, 1, bias=False))
        >>> torch.allclose(mix.weight.sum(), torch.tensor(1.0))
        True
    """
    return register_constraint(module, name, Simplex(dim))
