"""Invertible matrices and their relatives: GL+(n), SL(n) and almost-orthogonal matrices."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import bad_type, bad_value, check_square
from tether.constraints._base import Constraint, Draw, gaussian_matrix, register_constraint, worst
from tether.constraints._low_rank import _Factored, has_numerical_rank
from tether.constraints._orthogonal import Distribution, Orthogonal
from tether.functional import (
    factored,
    orthonormalize,
    positive_triangular,
    positive_triangular_inverse,
    special_orthonormalize,
)

__all__ = [
    "AlmostOrthogonal",
    "Invertible",
    "SpecialLinear",
    "almost_orthogonal",
    "invertible",
    "special_linear",
]

M = TypeVar("M", bound=nn.Module)
Scalar = Callable[[Tensor], Tensor]


def _scaled_sigmoid(t: Tensor) -> Tensor:
    """``2 sigmoid(t) - 1``, onto ``(-1, 1)``: ``tanh(t / 2)``."""
    return torch.tanh(t / 2)


def _scaled_sigmoid_inverse(y: Tensor) -> Tensor:
    return 2 * torch.atanh(y)


# geotorch's distributions for AlmostOrthogonal.sample: orthogonal samples, as it draws them.
_DISTRIBUTIONS = ("uniform", "torus")

# geotorch's maps onto [-1, 1] for almost_orthogonal, with their inverses and whether they
# reach the ends (sin does; tanh and the scaled sigmoid only in the limit).
_ALMOST_ORTHOGONAL_MAPS: dict[str, tuple[Scalar, Scalar, bool]] = {
    "sin": (torch.sin, torch.asin, True),
    "tanh": (torch.tanh, torch.atanh, False),
    "scaled_sigmoid": (_scaled_sigmoid, _scaled_sigmoid_inverse, False),
}

# Note [GL+(n) by QR]
#     Every X with det X > 0 is Q R in exactly one way with Q in SO(n) and R upper triangular
#     with a positive diagonal (QR with the signs fixed: det Q = det X / det R > 0). Invertible
#     stores two originals, original0 (B, shape (*, n, n)) and original1 (C, shape (*, n, n),
#     upper triangle read), and returns special_orthonormalize(B) @ positive_triangular(C):
#     onto GL+(n), det = exp(trace C), and right_inverse(X) = (Q, log-diagonal R) is exact.
#     SpecialLinear centres the diagonal of C first, so det = 1. GL+(n) is open: a matrix with
#     det X < 0 has no nearest member. right_inverse reflects it across the singular matrices
#     along its smallest singular direction, X - 2 σₙ uₙ vₙᵀ, which keeps every singular value
#     (so a well-conditioned initialisation stays one), flips the sign of det and lies 2 σₙ
#     away (twice the distance to the set). A singular X has no such reflection: ValueError.


def _reflect_negative(X: Tensor, sign: Tensor) -> Tensor:
    """``X - 2 σₙ uₙ vₙᵀ`` where ``sign < 0``, ``X`` elsewhere: see Note [GL+(n) by QR]."""
    if X.is_meta or not bool((sign < 0).any()):  # meta: no values, shapes only
        return X
    U, S, Vh = torch.linalg.svd(X)
    smallest = S[..., -1, None, None] * (U[..., :, -1:] @ Vh[..., -1:, :])
    return torch.where((sign < 0)[..., None, None], X - 2 * smallest, X)


def _centred_triangular(C: Tensor) -> Tensor:
    """:func:`positive_triangular` with the log-diagonal centred: determinant 1."""
    diagonal = C.diagonal(dim1=-2, dim2=-1)
    shift = diagonal - diagonal.mean(dim=-1, keepdim=True)
    return C.triu(1) + torch.diag_embed(shift.exp())


def _centred_triangular_inverse(R: Tensor) -> Tensor:
    C = positive_triangular_inverse(R)
    diagonal = C.diagonal(dim1=-2, dim2=-1)
    return C.triu(1) + torch.diag_embed(diagonal - diagonal.mean(dim=-1, keepdim=True))


class Invertible(Constraint):
    """Invertible matrices with a positive determinant: GL+(n), as ``Q R``.

    The set is ``{X : det X > 0}`` for square weights of shape ``(*, n, n)``, the connected
    component of the identity among invertible matrices (the other, ``det X < 0``, cannot
    be reached continuously without crossing a singular matrix). The map is the QR
    decomposition read backwards: ``X = Q R`` with ``Q`` in SO(n) (the oriented QR of the
    original ``B``, :func:`tether.functional.special_orthonormalize`) and ``R`` upper
    triangular with diagonal ``exp(c)`` (:func:`tether.functional.positive_triangular` of the
    original ``C``); ``log det X = trace C``, cheap for flows and volume penalties. Choose it
    for weights that must stay invertible (invertible layers, change of basis); choose
    :class:`SpecialLinear` to fix the volume, :class:`AlmostOrthogonal` to bound the
    conditioning as well.

    ``right_inverse`` sets any member exactly. A matrix with ``det < 0`` is reflected across
    the singular matrices along its smallest singular direction, ``X - 2 σₙ uₙ vₙᵀ`` (same
    singular values, ``det`` negated); there is no nearest member, the set being open. The
    ``state_dict`` holds ``original0`` (``B``, ``(*, n, n)``) and ``original1`` (``C``,
    ``(*, n, n)``, upper triangle used); see Note [GL+(n) by QR] in the source. Samples have
    i.i.d. ``N(0, 1/n)`` entries conditioned on ``det > 0`` (the first row negated where
    ``det < 0``). :meth:`distance` is the Frobenius distance to the closure: ``σₙ`` where
    ``det <= 0``, else 0; :meth:`in_manifold` also asks for full numerical rank (``σₙ`` above
    ``n · eps(dtype) · σ₁``, the threshold of ``torch.linalg.matrix_rank``), so singular
    matrices are not members.

    Args:
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: at registration or assignment, the tensor is not square, or a matrix is
            singular (``det X = 0``: it has no reflection).

    Example:
        >>> import torch, tether
        >>> layer = tether.invertible(torch.nn.Linear(4, 4))
        >>> bool(torch.linalg.det(layer.weight) > 0)
        True
    """

    _owner = "invertible()"
    supports_complex = False

    def __init__(self, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self._triangular: Callable[[Tensor], Tensor] = positive_triangular
        self._triangular_inverse: Callable[[Tensor], Tensor] = positive_triangular_inverse

    def forward(self, B: Tensor, C: Tensor) -> Tensor:  # type: ignore[override]  # two originals
        return special_orthonormalize(B) @ self._triangular(C)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]  # two originals
        self.check_shape(X.shape, "the assigned value")
        values = not X.is_meta  # on the meta device only shapes are computed
        sign = torch.linalg.slogdet(X).sign
        if values and not bool((sign != 0).all()):
            raise self._singular()
        Q, R = torch.linalg.qr(_reflect_negative(X, sign))
        # Signs fixed so that R has a positive diagonal: then det Q = det X / det R > 0.
        signs = R.diagonal(dim1=-2, dim2=-1).sign()
        if values and not bool((signs != 0).all()):
            raise self._singular()
        return Q * signs.unsqueeze(-2), self._triangular_inverse(R * signs.unsqueeze(-1))

    def _singular(self) -> ValueError:
        return ValueError(
            f"{self._owner}: the assigned value is singular (determinant 0), so it has no "
            "nearest invertible matrix. Assign an invertible matrix, e.g. "
            f"{type(self).__name__}().sample(shape), or add a small multiple of the identity."
        )

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """I.i.d. ``N(0, 1/n)`` entries, conditioned on ``det > 0`` (first row negated)."""
        shape = torch.Size(shape)
        self.check_shape(shape, "the sample")
        G = gaussian_matrix(shape, draw)
        sign = torch.where(torch.linalg.det(G) < 0, -1.0, 1.0).to(G.dtype)
        G[..., 0, :] *= sign.unsqueeze(-1)
        return G

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius distance to GL+(n)'s closure: ``σₙ(X)`` where ``det X <= 0``, else 0."""
        sign = torch.linalg.slogdet(X).sign
        smallest = torch.linalg.svdvals(X)[..., -1]
        return worst(torch.where(sign > 0, torch.zeros_like(smallest), smallest))

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """``distance(X) <= atol`` and full numerical rank: ``σₙ > n · eps · σ₁``."""
        return super().in_manifold(X, atol) and has_numerical_rank(X, X.shape[-1])

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_square(self._owner, label, shape)


class SpecialLinear(Invertible):
    """Matrices with determinant 1: SL(n), as ``Q R`` with ``det R = 1``.

    The set is ``{X : det X = 1}`` for square weights of shape ``(*, n, n)``: linear maps
    that preserve volume and orientation. The map is :class:`Invertible`'s with the log of
    ``R``'s diagonal centred (``exp(c - mean c)``), so the determinant is 1 by construction,
    not by a penalty. Choose it for volume-preserving layers (normalising flows with a zero
    log-determinant, incompressible dynamics); choose :class:`Invertible` when the volume may
    change, :func:`tether.special_orthogonal` when lengths must be kept as well.

    ``right_inverse`` sets any member exactly and replaces a matrix with ``det X > 0`` by the
    multiple ``X / det(X)^(1/n)`` (the member on the ray through ``X``, which keeps its
    condition number; not the Frobenius-nearest member, which has no closed form). A matrix
    with ``det X < 0`` is first reflected as :class:`Invertible` does. The ``state_dict``
    layout is :class:`Invertible`'s (the diagonal of ``original1`` is stored centred). Samples
    are :class:`Invertible`'s scaled to ``det = 1``. :meth:`distance` is ``|log det X|`` where
    ``det X > 0`` and ``inf`` elsewhere.

    Args:
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: at registration or assignment, the tensor is not square, or a matrix is
            singular.

    Example:
        >>> import torch, tether
        >>> layer = tether.special_linear(torch.nn.Linear(3, 3))
        >>> round(torch.linalg.det(layer.weight).item(), 4)
        1.0
    """

    _owner = "special_linear()"

    def __init__(self, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self._triangular = _centred_triangular
        self._triangular_inverse = _centred_triangular_inverse

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """:meth:`Invertible.sample` scaled to determinant 1."""
        G = super()._draw(shape, draw)
        logdet = torch.linalg.slogdet(G).logabsdet
        return G * torch.exp(-logdet / G.shape[-1])[..., None, None]

    def distance(self, X: Tensor) -> Tensor:
        """``|log det X|`` where ``det X > 0``, ``inf`` where ``det X <= 0``."""
        sign, logabsdet = torch.linalg.slogdet(X)
        return worst(torch.where(sign > 0, logabsdet.abs(), torch.full_like(logabsdet, math.inf)))


class AlmostOrthogonal(_Factored):
    """Matrices whose singular values lie in ``[1 - lam, 1 + lam]``: ``U diag(1 + lam sin s) Vᵀ``.

    The set is ``{X : 1 - lam <= σᵢ(X) <= 1 + lam for every i}`` for weights of shape
    ``(*, n, k)``, tall, wide or square, with ``r = min(n, k)`` singular values; ``lam = 1``
    allows ``[0, 2]``. ``U`` (``n x r``) and ``V`` (``k x r``) have orthonormal columns
    (:func:`tether.functional.orthonormalize` of the originals). The condition number is at
    most ``(1 + lam) / (1 - lam)`` and the norm at most ``1 + lam``: gradients neither
    explode nor vanish through the layer, with more freedom than :func:`tether.orthogonal`
    (``lam -> 0``). Use it for recurrent kernels and deep linear stacks. The singular values
    are ``1 + lam f(s)``; ``f`` is ``sin`` by default, as in geotorch: ``sin`` reaches the
    ends of the interval, so every member is set exactly. With ``"tanh"`` or
    ``"scaled_sigmoid"`` (``2 sigmoid(s) - 1``), geotorch's other choices, the ends are
    reached only in the limit: a singular value at an end is set to within rounding.

    Registration keeps a member as it is and replaces any other matrix by the nearest member
    (its SVD with the singular values clamped to the interval). The ``state_dict`` is
    :class:`LowRank`'s with ``r = min(n, k)``: ``original0`` (``(*, n, r)``), ``original1``
    (``(*, r)``), ``original2`` (``(*, k, r)``). Samples have Haar-distributed singular
    vectors and singular values i.i.d. uniform on the interval, or are orthogonal matrices
    with geotorch's ``sample("uniform")`` and ``sample("torus")`` (see :meth:`sample`).
    :meth:`distance` is the Frobenius distance to the set.

    Args:
        lam: the radius of the interval, ``0 < lam <= 1``.
        f: the map onto ``[-1, 1]``: ``"sin"``, ``"tanh"``, ``"scaled_sigmoid"``, or a pair
            of callables ``(f, f_inverse)`` acting elementwise (keep them module-level
            functions for the model to pickle). A single callable, which geotorch accepts, is
            refused: registration sets the weight through the inverse.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``lam`` is not a real number.
        ValueError: ``lam`` is outside ``(0, 1]`` or ``f`` is none of the above; or, at
            registration, the tensor is not a matrix.

    References:
        Orthogonal Recurrent Neural Networks and Batch Normalization in Deep Neural Networks.
        Eugene Vorontsov, Chiheb Trabelsi, Samuel Kadoury, Chris Pal, 2017 (spectral margin
        parametrization). https://arxiv.org/abs/1702.00071

    Example:
        >>> import torch, tether
        >>> layer = tether.almost_orthogonal(torch.nn.Linear(6, 3), lam=0.25)
        >>> sigma = torch.linalg.svdvals(layer.weight)
        >>> bool(((sigma >= 0.75 - 1e-6) & (sigma <= 1.25 + 1e-6)).all())
        True
    """

    _owner = "almost_orthogonal()"

    def __init__(
        self,
        lam: float = 0.1,
        f: str | tuple[Scalar, Scalar] = "sin",
        *,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(size=size)
        self.lam = _radius(lam, self._owner)
        self.f = f
        self._f, self._f_inverse, self._closed = _almost_orthogonal_map(f, self._owner)

    def _rank(self, shape: Sequence[int]) -> int:
        return min(shape[-2:])

    def _values(self, s: Tensor) -> Tensor:
        return 1 + self.lam * self._f(s)

    def _originals(self, sigma: Tensor) -> Tensor:
        # An open image: the ends stand for the nearest points inside, so the original is finite.
        end = 1.0 if self._closed else 1.0 - torch.finfo(sigma.dtype).eps
        return self._f_inverse(((sigma - 1) / self.lam).clamp(-end, end))

    def _excess(self, sigma: Tensor) -> Tensor:
        return ((sigma - 1).abs() - self.lam).clamp_min(0)

    def sample(
        self,
        shape: Sequence[int] | Distribution | None = None,
        *,
        distribution: Distribution | None = None,
        init_: Callable[[Tensor], object] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw a member: singular values spread over the interval, or an orthogonal matrix.

        As :meth:`Constraint.sample`. Without ``distribution``, the singular vectors are
        Haar-distributed and the singular values i.i.d. uniform on ``[1 - lam, 1 + lam]``.
        With geotorch's ``distribution`` (also accepted in place of the shape,
        ``sample("torus")``), the sample is an orthogonal matrix (all singular values 1, the
        centre of the interval), as geotorch's ``AlmostOrthogonal.sample`` returns: drawn as
        :meth:`tether.constraints.Orthogonal.sample` draws it, from the Haar measure
        (``"uniform"``) or near a torus (``"torus"``, the initialisation of recurrent
        kernels, angles drawn by ``init_``).

        Args:
            shape: the shape, or a distribution (then the shape is the registered one).
            distribution: ``"uniform"`` or ``"torus"``: an orthogonal sample, see above.
            init_: fills a tensor of angles in place (a ``torch.nn.init`` function); only
                with ``"torus"``.
            dtype: the dtype of the sample.
            device: its device.
            generator: the random number generator.

        Raises:
            ValueError: an unknown distribution, or ``init_`` without ``"torus"``.
            TypeError: the distribution given twice, or no shape on a constraint built
                without ``size=`` and never registered.

        Example:
            >>> import torch, tether
            >>> layer = tether.almost_orthogonal(torch.nn.Linear(6, 6), "weight", 0.5)
            >>> layer.weight = layer.parametrizations.weight[0].sample("torus")
            >>> W = layer.weight
            >>> torch.allclose(W.T @ W, torch.eye(6), atol=1e-5)
            True
        """
        if isinstance(shape, str):
            if distribution is not None:
                raise TypeError(
                    f"{type(self).__name__}.sample() got the distribution twice: {shape!r} "
                    f"and distribution={distribution!r}. Pass it once."
                )
            shape, distribution = None, shape
        if distribution is not None and distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"{type(self).__name__}.sample(): distribution must be one of "
                f"{', '.join(map(repr, _DISTRIBUTIONS))} (an orthogonal sample), or None for "
                f"singular values spread over the interval; got {distribution!r}."
            )
        if init_ is not None and distribution != "torus":
            raise ValueError(
                f"{type(self).__name__}.sample(): init_ draws the torus' angles; it needs "
                f"distribution='torus', got {distribution!r}."
            )
        return self._sample(shape, dtype, device, generator, distribution=distribution, init_=init_)

    def _draw(
        self,
        shape: torch.Size,
        draw: Draw,
        distribution: Distribution | None = None,
        init_: Callable[[Tensor], object] | None = None,
    ) -> Tensor:
        """Haar-distributed singular vectors, singular values i.i.d. uniform on the interval.

        With a ``distribution``, an orthogonal matrix drawn as :class:`Orthogonal` draws it.
        """
        shape = torch.Size(shape)
        self.check_shape(shape, "the sample")
        if distribution is not None:
            return Orthogonal()._draw(shape, draw, distribution, init_)
        *batch, n, k = shape
        r = min(n, k)
        U = torch.randn(*batch, n, r, **draw.kwargs)
        V = torch.randn(*batch, k, r, **draw.kwargs)
        # Real singular values, for complex matrices too.
        t = torch.rand(*batch, r, dtype=U.real.dtype, device=draw.device, generator=draw.generator)
        return factored(orthonormalize(U), 1 + self.lam * (2 * t - 1), orthonormalize(V))

    def extra_repr(self) -> str:
        f = self.f if isinstance(self.f, str) else "(custom)"
        return f"lam={self.lam}, f={f!r}"


def invertible(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to invertible matrices with ``det > 0`` (:class:`Invertible`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.

    Returns:
        ``module``.

    Raises:
        ValueError: the tensor is not square (or a batch of square matrices), or singular.

    Example:
        >>> import torch, tether
        >>> layer = tether.invertible(torch.nn.Linear(3, 3))
        >>> bool(torch.linalg.det(layer.weight) > 0)
        True
    """
    return register_constraint(module, name, Invertible())


def special_linear(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to determinant 1 (:class:`SpecialLinear`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.

    Returns:
        ``module``.

    Raises:
        ValueError: the tensor is not square (or a batch of square matrices), or singular.
    """
    return register_constraint(module, name, SpecialLinear())


def almost_orthogonal(
    module: M,
    name: str = "weight",
    lam: float = 0.1,
    f: str | tuple[Scalar, Scalar] = "sin",
) -> M:
    """Constrain the singular values of ``module.<name>`` to ``[1 - lam, 1 + lam]``.

    See :class:`AlmostOrthogonal`. The arguments follow geotorch's order
    (``almost_orthogonal(module, "weight", 0.5, "tanh")``).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a matrix or batch of matrices.
        lam: the radius of the interval, ``0 < lam <= 1``.
        f: the map onto ``[-1, 1]``: ``"sin"`` (default), ``"tanh"``, ``"scaled_sigmoid"``,
            or a pair of callables ``(f, f_inverse)``.

    Returns:
        ``module``.

    Raises:
        TypeError: ``lam`` is not a real number.
        ValueError: ``lam`` is outside ``(0, 1]``, ``f`` is not one of the choices above, or
            the tensor is not a matrix.

    Example:
        >>> import torch, tether
        >>> layer = tether.almost_orthogonal(torch.nn.Linear(4, 4), "weight", 0.5, "tanh")
        >>> bool(torch.linalg.svdvals(layer.weight).max() <= 1.5 + 1e-6)
        True
    """
    return register_constraint(module, name, AlmostOrthogonal(lam, f))


def _almost_orthogonal_map(f: object, owner: str) -> tuple[Scalar, Scalar, bool]:
    """``f``, its inverse, and whether its image is all of ``[-1, 1]``."""
    if isinstance(f, str) and f in _ALMOST_ORTHOGONAL_MAPS:
        return _ALMOST_ORTHOGONAL_MAPS[f]
    if isinstance(f, tuple) and len(f) == 2 and all(callable(g) for g in f):
        return f[0], f[1], False
    choices = ", ".join(repr(name) for name in _ALMOST_ORTHOGONAL_MAPS)
    hint = (
        " A single callable needs its inverse too: pass (f, f_inverse), as registration sets "
        "the weight through it."
        if callable(f)
        else ""
    )
    raise ValueError(
        f"{owner}: `f` must be one of {choices} or a pair of callables (f, f_inverse) mapping "
        f"onto [-1, 1]; got {f!r}.{hint}"
    )


def _radius(lam: object, owner: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise bad_type(owner, "lam", "a real number in (0, 1]", lam)
    if not 0 < lam <= 1:
        raise bad_value(owner, "lam", "in (0, 1]", lam)
    return float(lam)
