"""Norm constraints on vectors: the sphere (``Sphere``) and the Poincaré ball (``PoincareBall``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import check_slices, dims, positive_number, tensor_label
from tether.constraints._base import Constraint, Draw, default_atol, register_constraint
from tether.functional._elementwise import Dim, poincare_exp, poincare_log, project_sphere

__all__ = ["PoincareBall", "Sphere", "poincare_ball", "sphere"]

M = TypeVar("M", bound=nn.Module)


class Sphere(Constraint):
    """Tensors of norm ``radius``: ``{X : ‖X‖ = radius}``, as a whole or slice by slice.

    ``dim`` names the dimensions the Euclidean norm runs over, as in
    :func:`torch.linalg.vector_norm` and :func:`torch.nn.functional.normalize`: with
    ``dim=None`` the whole tensor has norm ``radius``; with ``dim=-1`` every row does (for a
    ``Linear`` weight of shape ``(out, in)``, the weights of each output unit); with
    ``dim=(1, 2, 3)`` every filter of a ``Conv2d`` kernel ``(out, in, kh, kw)`` does. Note
    that :func:`torch.nn.utils.parametrizations.weight_norm` counts the other way: its ``dim``
    is the dimension kept, so its ``dim=0`` groups like ``dim=-1`` here on a ``Linear``
    weight, and like ``dim=(1, 2, 3)`` on a ``Conv2d`` kernel. geotorch's ``sphere`` always
    normalizes the last dimension (``dim=-1`` here).

    The map is the projection ``radius · X / ‖X‖``; it is scale-invariant, so it is a good
    choice for weight normalization without a learned gain (compare ``weight_norm``, which
    learns the norm). ``right_inverse`` returns ``X / ‖X‖``: members come back exactly and
    other tensors are projected, except tensors with a slice of norm 0 (or not finite),
    which have no nearest point on the sphere and raise a ``ValueError``. Samples are
    uniform on the sphere (normalized Gaussians). For vectors of norm at most a bound, see
    :class:`PoincareBall`.

    Args:
        radius: the norm, a positive number.
        dim: the dimensions the norm runs over: ``None`` (the whole tensor), an int or a
            tuple of distinct ints.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``radius`` is not a real number or ``dim`` not an int, tuple or None.
        ValueError: ``radius`` is not positive and finite, or ``dim`` repeats a dimension.

    Example:
        >>> import torch, tether
        >>> layer = tether.sphere(torch.nn.Linear(4, 3), radius=2.0, dim=-1)
        >>> torch.allclose(layer.weight.norm(dim=-1), torch.full((3,), 2.0))
        True
    """

    def __init__(
        self, radius: float = 1.0, *, dim: Dim = None, size: Sequence[int] | None = None
    ) -> None:
        super().__init__(size=size)
        self.radius = positive_number(radius, "radius", "sphere()")
        self.dim = dims(dim, "sphere()")

    def forward(self, X: Tensor) -> Tensor:
        return project_sphere(X, self.radius, self.dim)

    def right_inverse(self, X: Tensor) -> Tensor:
        self._check_projectable(X, "the assigned value")
        return X / torch.linalg.vector_norm(X, dim=self.dim, keepdim=True)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        self.check_shape(torch.Size(shape), "the sample")
        X = torch.randn(shape, **draw.kwargs)
        return project_sphere(X, self.radius, self.dim)

    def distance(self, X: Tensor) -> Tensor:
        return (torch.linalg.vector_norm(X, dim=self.dim) - self.radius).abs().amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_slices(f"sphere(dim={self.dim!r})", label, shape, self.dim)

    def extra_repr(self) -> str:
        return f"radius={self.radius!r}, dim={self.dim!r}"

    def _check_projectable(self, X: Tensor, label: str) -> None:
        """Raise a ValueError naming ``label`` if a slice of ``X`` has norm 0 or not finite."""
        if X.is_meta:  # no values to check on the meta device
            return
        norms = torch.linalg.vector_norm(X.detach(), dim=self.dim)
        if bool((norms > 0).all()) and bool(norms.isfinite().all()):
            return
        part = "it has norm" if self.dim is None else f"a slice along dim={self.dim!r} has norm"
        bad = "0" if bool((norms == 0).any()) else "inf or NaN"
        raise ValueError(
            f"Sphere(radius={self.radius!r}) cannot project {label}: {part} {bad}, so it is "
            f"{self.radius:.2e} or more from the sphere (tolerance {default_atol(X.dtype):.2e}) "
            "and has no nearest point on it. Give it a nonzero finite value first, e.g. "
            "Sphere(...).sample(shape)."
        )


class PoincareBall(Constraint):
    """The Poincaré ball of curvature ``-c``: ``{X : ‖X‖ < 1/√c}``, slice by slice along ``dim``.

    Points of hyperbolic space, for hyperbolic embeddings and layers. The map is the
    exponential map at the origin, ``tanh(√c ‖V‖) V / (√c ‖V‖)``
    (:func:`tether.functional.poincare_exp`), whose gradients, unlike those of a projection,
    never vanish on a whole region; its right inverse is the logarithmic map at the origin
    (``artanh``). Far from the origin ``tanh`` saturates: in floating point, originals with
    ``√c ‖V‖`` beyond about 9 (float32) or 19 (float64) stop a few ulps inside the boundary,
    where gradients vanish and hyperbolic distances are huge.

    Non-members (norm ``>= 1/√c``) have no nearest point in the open ball: ``right_inverse``
    moves them along their ray to norm ``(1 - √eps)/√c`` (``√eps`` is 3.5e-4 in float32 and
    1.5e-8 in float64), within the membership tolerance of the boundary. Samples are the
    image under the exponential map of a centred Gaussian with variance ``1 / (c n)`` per
    entry, ``n`` the number of entries of a point (a wrapped normal at the origin whose
    points lie at ``√c ‖V‖ ≈ 1``, well inside the ball for any ``n``).

    ``dim`` is read as in :class:`Sphere`: the dimensions a point spans (``-1``: each row is
    a point; ``None``: the whole tensor is one).

    Args:
        c: the curvature magnitude, a positive number; the ball's radius is ``1/√c``.
        dim: the dimensions a point spans: an int, a tuple of distinct ints or ``None``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``c`` is not a real number or ``dim`` not an int, tuple or None.
        ValueError: ``c`` is not positive and finite, or ``dim`` repeats a dimension.

    References:
        Hyperbolic Neural Networks (Ganea, Bécigneul, Hofmann, 2018),
        https://arxiv.org/abs/1805.09112

        A Wrapped Normal Distribution on Hyperbolic Space for Gradient-Based Learning
        (Nagano, Yamaguchi, Fujita, Koyama, 2019), https://arxiv.org/abs/1902.02992

    Example:
        >>> import torch, tether
        >>> embedding = tether.poincare_ball(torch.nn.Embedding(10, 2), c=4.0)
        >>> bool((embedding.weight.norm(dim=-1) < 0.5).all())
        True
    """

    def __init__(self, c: float = 1.0, *, dim: Dim = -1, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self.c = positive_number(c, "c", "poincare_ball()")
        self.dim = dims(dim, "poincare_ball()")

    def forward(self, X: Tensor) -> Tensor:
        return poincare_exp(X, self.c, self.dim)

    def right_inverse(self, X: Tensor) -> Tensor:
        r = math.sqrt(self.c) * torch.linalg.vector_norm(X, dim=self.dim, keepdim=True)
        margin = default_atol(X.dtype)
        X = X * torch.where(r < 1, 1.0, (1 - margin) / r.clamp_min(1))
        return poincare_log(X, self.c, self.dim)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        size = torch.Size(shape)
        self.check_shape(size, "the sample")
        wanted = range(len(size)) if self.dim is None else _as_tuple(self.dim)
        n = math.prod(size[d] for d in wanted)
        V = torch.randn(size, **draw.kwargs)
        return poincare_exp(V / math.sqrt(self.c * n), self.c, self.dim)

    def distance(self, X: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(X, dim=self.dim)
        return (norms - 1 / math.sqrt(self.c)).clamp_min(0).amax()

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_slices(f"poincare_ball(dim={self.dim!r})", label, shape, self.dim)

    def extra_repr(self) -> str:
        return f"c={self.c!r}, dim={self.dim!r}"


def sphere(module: M, name: str = "weight", radius: float = 1.0, *, dim: Dim = None) -> M:
    """Constrain ``module.<name>`` to norm ``radius``, whole or per slice (see :class:`Sphere`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        radius: the norm, a positive number.
        dim: the dimensions each normalised slice spans; ``None`` (default): the whole tensor.

    Raises:
        ValueError: the tensor (or a slice of it) has norm 0, so it cannot be projected.
    """
    constraint = Sphere(radius, dim=dim)
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor):
        label = tensor_label(module, name)
        constraint.check_dtype(tensor.dtype, label)
        constraint.check_shape(tensor.shape, label)
        constraint._check_projectable(tensor, label)
    return register_constraint(module, name, constraint)


def poincare_ball(module: M, name: str = "weight", c: float = 1.0, *, dim: Dim = -1) -> M:
    """Keep each slice of ``module.<name>`` in the Poincaré ball (see :class:`PoincareBall`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        c: the curvature's magnitude, positive: the ball has radius ``1 / sqrt(c)``.
        dim: the dimensions each slice spans (default: the last).
    """
    return register_constraint(module, name, PoincareBall(c, dim=dim))


def _as_tuple(dim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else dim
