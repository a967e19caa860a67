"""Maps behind weight normalization and spectral normalization: norms and power iteration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tether._torch_compat import weight_norm

__all__ = [
    "largest_singular_value",
    "norm_except_dim",
    "power_iteration",
    "singular_value_estimate",
    "weight_normalize",
]


def _whole_if_none(dim: int | None) -> int:
    # torch's convention, kept so that numerics match: dim=-1 means "the whole tensor".
    return -1 if dim is None else dim


def norm_except_dim(X: Tensor, dim: int | None = 0) -> Tensor:
    """The 2-norm of ``X`` over every dimension except ``dim``, shaped to broadcast with ``X``.

    For ``dim=0`` and ``X`` of shape ``(out, in)`` the result has shape ``(out, 1)``: the
    norm of each row. With ``dim=None`` the result is the norm of the whole tensor, of shape
    ``()``. Following :func:`torch.norm_except_dim`, ``dim=-1`` also means the whole tensor;
    other negative values count from the end.

    Args:
        X: any shape.
        dim: the dimension that is kept.

    Example:
        >>> import torch
        >>> from tether.functional import norm_except_dim
        >>> X = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> norm_except_dim(X, 0)
        tensor([[5.],
                [1.]])
    """
    return torch.norm_except_dim(X, 2, _whole_if_none(dim))


def weight_normalize(g: Tensor, v: Tensor, dim: int | None = 0) -> Tensor:
    """Weight normalization ``g * v / norm_except_dim(v, dim)``: magnitude ``g``, direction ``v``.

    The same computation (and the same fused kernels) as
    :func:`torch.nn.utils.parametrizations.weight_norm`. Its right inverse is
    ``W -> (norm_except_dim(W, dim), W)``. Complex ``v`` with one magnitude per index of
    ``dim`` (which torch's fused kernel refuses: "not implemented for 'ComplexFloat'") is
    scaled by ``g / norm_except_dim(v, dim)``, real magnitudes as for the whole tensor.

    Args:
        g: the magnitudes, shaped like ``norm_except_dim(v, dim)``.
        v: the directions, any shape.
        dim: as in :func:`norm_except_dim` (``None`` or ``-1``: one magnitude for the whole
            tensor).

    Example:
        >>> import torch
        >>> from tether.functional import norm_except_dim, weight_normalize
        >>> W = torch.randn(4, 3)
        >>> torch.allclose(weight_normalize(norm_except_dim(W, 0), W, 0), W)
        True
    """
    dim = _whole_if_none(dim)
    if v.is_complex() and dim != -1:
        return v * (g / torch.norm_except_dim(v, 2, dim))
    out: Tensor = weight_norm(v, g, dim)
    return out


def _mv(W: Tensor, x: Tensor) -> Tensor:
    # torch.mv for a single matrix, so that results match torch's spectral_norm bit for bit.
    if W.ndim == 2:
        return torch.mv(W, x)
    return (W @ x.unsqueeze(-1)).squeeze(-1)


def power_iteration(
    W: Tensor, u: Tensor, v: Tensor, n_power_iterations: int = 1, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Steps of the power method towards the top singular vectors of ``W``.

    Each step computes ``u = normalize(W v)`` then ``v = normalize(Wᴴ u)``, where
    ``normalize(x) = x / max(‖x‖, eps)``: the update of
    :func:`torch.nn.utils.parametrizations.spectral_norm`, with the same results. The inputs
    are not modified; call it under :func:`torch.no_grad` when the vectors are state.

    Args:
        W: shape ``(*, m, n)``.
        u: shape ``(*, m)``, the current left vector (only its batch shape matters: the first
            step overwrites it).
        v: shape ``(*, n)``, the current right vector.
        n_power_iterations: number of steps.
        eps: floor of the norms, so that a zero vector does not divide by zero.

    Returns:
        The new ``(u, v)``, unit vectors.

    Example:
        >>> import torch
        >>> from tether.functional import power_iteration, singular_value_estimate
        >>> W = torch.diag(torch.tensor([3.0, 1.0]))
        >>> u, v = power_iteration(W, torch.ones(2), torch.ones(2), 20)
        >>> singular_value_estimate(W, u, v)
        tensor(3.)
    """
    # Vectors kept as state may be stored in a lower precision than W is computed in.
    u, v = u.to(W.dtype), v.to(W.dtype)
    for _ in range(n_power_iterations):
        u = F.normalize(_mv(W, v), dim=-1, eps=eps)
        v = F.normalize(_mv(W.mH, u), dim=-1, eps=eps)
    return u, v


def singular_value_estimate(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The estimate ``uᴴ W v`` of the largest singular value of ``W`` from unit vectors.

    With ``(u, v)`` from :func:`power_iteration` it is at most the largest singular value and
    converges to it. Differentiable in ``W`` (the vectors are treated as constants, as in
    spectral normalization).

    Args:
        W: shape ``(*, m, n)``.
        u: shape ``(*, m)``.
        v: shape ``(*, n)``.

    Returns:
        Shape ``(*)``.
    """
    u, v = u.to(W.dtype), v.to(W.dtype)
    if W.ndim == 2:
        return torch.vdot(u, torch.mv(W, v))
    return (u.conj() * _mv(W, v)).sum(-1)


def largest_singular_value(W: Tensor) -> Tensor:
    """The largest singular value of ``W`` (its spectral norm), computed exactly.

    Costs a singular value decomposition, so it suits small matrices; its gradient is exact
    where the largest singular value is simple.

    Args:
        W: shape ``(*, m, n)``.

    Returns:
        Shape ``(*)``, real.

    Example:
        >>> import torch
        >>> from tether.functional import largest_singular_value
        >>> largest_singular_value(torch.diag(torch.tensor([3.0, -5.0])))
        tensor(5.)
    """
    return torch.linalg.matrix_norm(W, ord=2)
