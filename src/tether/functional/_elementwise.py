"""Maps onto vector and elementwise sets: spheres, the Poincaré ball, positives, the simplex.

Unlike the matrix maps, these take tensors of any shape. The vector maps act on slices: ``dim``
names the dimensions a norm or a sum runs over, as in :func:`torch.linalg.vector_norm` (an
int, a tuple of ints, or ``None`` for the whole tensor), so each choice of the remaining
indices picks one vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import Tensor

__all__ = [
    "poincare_exp",
    "poincare_log",
    "project_simplex",
    "project_sphere",
    "softplus_inverse",
]

Dim: TypeAlias = int | tuple[int, ...] | None


def project_sphere(X: Tensor, radius: float = 1.0, dim: Dim = None) -> Tensor:
    """The nearest point of norm ``radius``: ``radius · X / ‖X‖``, slice by slice.

    A projection, so it is its own right inverse: it leaves points of norm ``radius`` where
    they are. Undefined (NaN) on slices of norm 0, which have no nearest point.

    Args:
        X: any shape.
        radius: the norm of the result's slices.
        dim: the dimensions the norm runs over; ``None`` for the whole tensor.

    Example:
        >>> import torch
        >>> from tether.functional import project_sphere
        >>> Y = project_sphere(torch.randn(3, 5), radius=2.0, dim=-1)
        >>> torch.allclose(torch.linalg.vector_norm(Y, dim=-1), torch.full((3,), 2.0))
        True
    """
    return X * (radius / torch.linalg.vector_norm(X, dim=dim, keepdim=True))


def poincare_exp(V: Tensor, c: float = 1.0, dim: Dim = -1) -> Tensor:
    """The exponential map at the origin of the Poincaré ball of curvature ``-c``.

    ``exp₀(v) = tanh(√c ‖v‖) v / (√c ‖v‖)``, slice by slice, equal to ``v`` to first order near
    0 (the ratio ``tanh(u)/u`` is evaluated by its Taylor series there, so the map and its
    gradient stay smooth at ``v = 0``). Its image is the open ball ``‖x‖ < 1/√c``; in floating
    point, slices with ``√c ‖v‖`` beyond about 9 (float32) or 19 (float64) stop a few ulps
    inside its boundary rather than round onto it. Right inverse: :func:`poincare_log`.

    Args:
        V: any shape.
        c: the (positive) curvature magnitude.
        dim: the dimensions a point spans; ``None`` for the whole tensor.

    References:
        Hyperbolic Neural Networks (Ganea, Bécigneul, Hofmann, 2018),
        https://arxiv.org/abs/1805.09112

    Example:
        >>> import torch
        >>> from tether.functional import poincare_exp, poincare_log
        >>> V = torch.randn(4, 3, dtype=torch.float64)
        >>> X = poincare_exp(V, c=2.0)
        >>> bool((torch.linalg.vector_norm(X, dim=-1) < 2.0**-0.5).all())
        True
        >>> torch.allclose(poincare_log(X, c=2.0), V)
        True
    """
    # tanh rounds to 1 for large arguments; stop a few ulps short so that the point stays
    # strictly inside the ball (where poincare_log and hyperbolic distances are finite).
    ceiling = 1.0 - 4.0 * torch.finfo(V.dtype).eps
    return V * _ratio(V, c, dim, lambda u: torch.tanh(u).clamp_max(ceiling), -1.0 / 3.0)


def poincare_log(X: Tensor, c: float = 1.0, dim: Dim = -1) -> Tensor:
    """The logarithmic map at the origin of the Poincaré ball: the inverse of ``poincare_exp``.

    ``log₀(x) = artanh(√c ‖x‖) x / (√c ‖x‖)``, slice by slice, for ``x`` strictly inside the
    ball ``‖x‖ < 1/√c`` (infinite or NaN on and beyond its boundary).

    Args:
        X: any shape, each slice strictly inside the ball.
        c: the (positive) curvature magnitude.
        dim: the dimensions a point spans; ``None`` for the whole tensor.
    """
    return X * _ratio(X, c, dim, torch.atanh, 1.0 / 3.0)


def _ratio(X: Tensor, c: float, dim: Dim, f: Callable[[Tensor], Tensor], taylor: float) -> Tensor:
    """``f(u) / u`` at ``u = √c ‖x‖`` per slice, with ``f(u)/u ≈ 1 + taylor · u²`` near 0.

    Note [Smooth ratio at 0]: ``f(u)/u`` is 0/0 at ``u = 0``, and the gradient of a norm is
    undefined there. Below ``u² = √eps`` the next Taylor term (of order ``u⁴``) is below eps, so
    the series is exact to rounding; it is written in ``u²`` (no square root), and the other
    branch sees a harmless ``u = 1`` (the double-``where`` trick), so that no NaN reaches the
    gradient either.
    """
    u2 = c * torch.linalg.vector_norm(X, dim=dim, keepdim=True).square()
    small = u2 < math.sqrt(torch.finfo(X.dtype).eps)
    u = torch.where(small, torch.ones_like(u2), u2).sqrt()
    return torch.where(small, 1.0 + taylor * u2, f(u) / u)


def softplus_inverse(Y: Tensor) -> Tensor:
    """The inverse of ``softplus(x) = log(1 + eˣ)``: ``log(eʸ - 1)`` for ``y > 0``.

    Computed as ``y + log(-expm1(-y))``, which neither overflows for large ``y`` (where the
    result is ``y`` to rounding) nor loses digits for small ``y`` (where it is ``log(y)``).

    Args:
        Y: any shape, positive entries.

    Example:
        >>> import torch
        >>> from tether.functional import softplus_inverse
        >>> Y = torch.tensor([1e-6, 0.5, 30.0, 1e4], dtype=torch.float64)
        >>> torch.allclose(torch.nn.functional.softplus(softplus_inverse(Y)), Y)
        True
    """
    return Y + torch.log(-torch.expm1(-Y))


def project_simplex(X: Tensor, dim: int = -1) -> Tensor:
    """The Euclidean projection of each slice along ``dim`` onto the probability simplex.

    The nearest point ``p`` with ``p ≥ 0`` and ``Σ p = 1`` is ``max(x - θ, 0)`` for the
    threshold ``θ`` found by sorting (``O(n log n)`` per slice). A projection, so it is its own
    right inverse. The maps onto the open simplex are :func:`torch.softmax` and its right
    inverse :func:`torch.log` (up to the softmax's invariance to adding a constant).

    Args:
        X: at least one dimension.
        dim: the dimension that sums to 1.

    References:
        Projection onto the probability simplex: An efficient algorithm with a simple proof,
        and an application (Wang, Carreira-Perpiñán, 2013), https://arxiv.org/abs/1309.1541

    Example:
        >>> import torch
        >>> from tether.functional import project_simplex
        >>> project_simplex(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
    """
    Z = X.movedim(dim, -1)
    u = Z.sort(dim=-1, descending=True).values
    excess = u.cumsum(dim=-1) - 1
    k = torch.arange(1, Z.shape[-1] + 1, dtype=X.dtype, device=X.device)
    # The entries kept (> 0) are the largest rho; the test below holds exactly for j <= rho.
    rho = (u - excess / k > 0).sum(dim=-1, keepdim=True)
    theta = excess.gather(-1, rho - 1) / rho.to(X.dtype)
    return (Z - theta).clamp_min(0).movedim(-1, dim)
