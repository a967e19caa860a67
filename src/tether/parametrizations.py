"""A drop-in for ``torch.nn.utils.parametrizations``: orthogonal, spectral and weight norm.

``import tether.parametrizations as parametrizations`` replaces
``import torch.nn.utils.parametrizations as parametrizations``: the three functions take the
same arguments, with the same names, kinds and defaults, and register tether's constraints,
which compute the same values and keep the same ``state_dict`` keys, so checkpoints move both
ways. They forward to :func:`tether.orthogonal`, :func:`tether.spectral_norm` and
:func:`tether.weight_norm`, which offer more keyword-only options (``bound=``, ``exact=``,
``conv_operator=`` for the spectral norm); use those directly when you need them.

Example:
    >>> import torch
    >>> import tether.parametrizations as parametrizations
    >>> layer = parametrizations.weight_norm(torch.nn.Linear(3, 4))
    >>> list(layer.state_dict())
    ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
"""

from __future__ import annotations

from typing import TypeVar, cast

from torch import nn

from tether.constraints._orthogonal import OrthogonalMap
from tether.constraints._orthogonal import orthogonal as _orthogonal
from tether.constraints._spectral_norm import spectral_norm as _spectral_norm
from tether.constraints._weight_norm import weight_norm as _weight_norm

__all__ = ["orthogonal", "spectral_norm", "weight_norm"]

M = TypeVar("M", bound=nn.Module)


def orthogonal(
    module: M,
    name: str = "weight",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
) -> M:
    """Constrain ``module.<name>`` to orthonormal columns or rows; see :func:`tether.orthogonal`.

    The signature of :func:`torch.nn.utils.parametrizations.orthogonal`.

    Args:
        module: the module holding the tensor.
        name: the matrix (or batch of matrices) to constrain.
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``; ``None`` picks
            ``"matrix_exp"`` for square or complex tensors and ``"householder"`` otherwise.
        use_trivialization: keep an orthogonal base point, so that any orthogonal value can
            be assigned.

    Returns:
        ``module``.

    Raises:
        ValueError: the tensor is not a matrix or batch of matrices, the map is unknown, or
            ``"householder"`` is asked for a complex tensor.

    Example:
        >>> import torch
        >>> import tether.parametrizations as parametrizations
        >>> Q = parametrizations.orthogonal(torch.nn.Linear(3, 3)).weight
        >>> torch.allclose(Q.T @ Q, torch.eye(3), atol=1e-6)
        True
    """
    # tether.orthogonal checks the value and names the accepted maps if it is not one.
    chosen = cast("OrthogonalMap | None", orthogonal_map)
    return _orthogonal(module, name, chosen, use_trivialization=use_trivialization)


def spectral_norm(
    module: M,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> M:
    """Divide ``module.<name>`` by its largest singular value; see :func:`tether.spectral_norm`.

    The signature of :func:`torch.nn.utils.parametrizations.spectral_norm`: the power method
    with the same draws, buffers (``_u``, ``_v``) and results.

    Args:
        module: the module holding the tensor.
        name: the tensor to normalize.
        n_power_iterations: power-method steps per evaluation in training mode.
        eps: floor of the norms in the power method.
        dim: the dimension of the outputs; ``None`` for 0, or 1 for transposed convolutions.

    Returns:
        ``module``.

    Raises:
        ValueError: a bad ``n_power_iterations`` or ``eps``, or a tensor with no dimensions.
        IndexError: ``dim`` is out of range.

    Example:
        >>> import torch
        >>> import tether.parametrizations as parametrizations
        >>> layer = parametrizations.spectral_norm(torch.nn.Linear(6, 4))
        >>> sorted(layer.parametrizations.weight[0].state_dict())
        ['_u', '_v']
    """
    return _spectral_norm(module, name, n_power_iterations, eps, dim)


def weight_norm(module: M, name: str = "weight", dim: int | None = 0) -> M:
    """Write ``module.<name>`` as a magnitude times a direction; see :func:`tether.weight_norm`.

    The signature of :func:`torch.nn.utils.parametrizations.weight_norm`; checkpoints of the
    hook-based :func:`torch.nn.utils.weight_norm` (``weight_g``, ``weight_v``) load too.

    Args:
        module: the module holding the tensor.
        name: the tensor to reparametrize.
        dim: the dimension that keeps one magnitude per index; ``None`` for one magnitude.

    Returns:
        ``module``.

    Raises:
        ValueError: ``module`` has no tensor ``name``, or it has no dimensions.
        TypeError: ``dim`` is not an int or ``None``, or the tensor is not floating point.
        IndexError: ``dim`` is out of range for the tensor.

    Example:
        >>> import torch
        >>> import tether.parametrizations as parametrizations
        >>> layer = parametrizations.weight_norm(torch.nn.Linear(3, 4), dim=None)
        >>> layer.parametrizations.weight.original0.shape
        torch.Size([])
    """
    return _weight_norm(module, name, dim)
