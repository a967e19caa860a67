"""Weight normalization: a tensor as a magnitude times a unit direction."""

from __future__ import annotations

import functools
from typing import TypeVar

from torch import Tensor, nn

from tether._checks import bad_dtype, bad_shape, bad_type, check_dim, tensor_label
from tether.constraints._legacy_checkpoints import add_load_hook, load_weight_norm
from tether.functional import norm_except_dim, weight_normalize
from tether.parametrize import register_parametrization

__all__ = ["WeightNorm", "weight_norm"]

M = TypeVar("M", bound=nn.Module)


class WeightNorm(nn.Module):
    """Weight normalization: a tensor written as a magnitude times a direction.

    ``W = g v / ‖v‖``, the norm taken over every dimension except ``dim`` (see
    :func:`tether.functional.norm_except_dim`): with ``dim=0`` each output row or channel has
    its own magnitude ``g``, with ``dim=None`` the whole tensor has one. Every tensor can be
    written this way, so this is a reparametrization rather than a constraint: it decouples
    the length of the weights from their direction, which often speeds up training. The two
    originals are ``original0 = g`` (shape of ``norm_except_dim(W, dim)``) and
    ``original1 = v`` (shape of ``W``), as in
    :func:`torch.nn.utils.parametrizations.weight_norm`, whose numerics it shares.

    Register it with :func:`tether.weight_norm`, which also loads checkpoints of the older
    :func:`torch.nn.utils.weight_norm` (``weight_g``, ``weight_v``).

    Args:
        dim: the dimension that keeps one magnitude per index; ``None`` (or ``-1``, as in
            torch) for a single magnitude.

    References:
        Weight Normalization: A Simple Reparameterization to Accelerate Training of Deep
        Neural Networks. Tim Salimans, Diederik P. Kingma, 2016.
        https://arxiv.org/abs/1602.07868

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(
        ...     torch.nn.Linear(3, 4), "weight", tether.constraints.WeightNorm(dim=0)
        ... )
        >>> g = layer.parametrizations.weight.original0
        >>> g.shape, torch.allclose(layer.weight.norm(dim=1), g.flatten())
        (torch.Size([4, 1]), True)
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
            raise bad_type("WeightNorm", "dim", "an int or None", dim)
        self.dim = -1 if dim is None else dim

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_normalize(weight_g, weight_v, self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        if not (weight.is_floating_point() or weight.is_complex()):
            raise bad_dtype(type(self).__name__, weight.dtype)
        return norm_except_dim(weight, self.dim), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def weight_norm(module: M, name: str = "weight", dim: int | None = 0) -> M:
    """Apply weight normalization ``W = g v / ‖v‖`` to ``module.<name>`` (see :class:`WeightNorm`).

    A drop-in for :func:`torch.nn.utils.parametrizations.weight_norm`: the same signature,
    results, ``state_dict`` keys (``parametrizations.weight.original0`` for ``g``,
    ``original1`` for ``v``) and right inverse, so checkpoints move both ways. Checkpoints of
    the hook-based :func:`torch.nn.utils.weight_norm` (``weight_g``, ``weight_v``) load too.

    Args:
        module: the module holding the tensor.
        name: the parameter or buffer to normalize.
        dim: the dimension that keeps one magnitude per index (``0``: per output row or
            channel); ``None`` for one magnitude for the whole tensor.

    Returns:
        ``module``.

    Raises:
        ValueError: ``module`` has no tensor ``name``, or it has no dimensions.
        TypeError: ``dim`` is not an int or ``None``, or the tensor is not floating point
            (or complex).
        IndexError: ``dim`` is out of range for the tensor.

    Example:
        >>> import torch, tether
        >>> layer = tether.weight_norm(torch.nn.Linear(20, 40))
        >>> list(layer.state_dict())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
    """
    weight = getattr(module, name, None)
    # A name that holds no tensor is left to register_parametrization, whose error (the same
    # for every registering function) lists the tensors that can be parametrized.
    if isinstance(weight, Tensor):
        label = tensor_label(module, name)
        if not (weight.is_floating_point() or weight.is_complex()):
            raise bad_dtype("WeightNorm", weight.dtype, label)
        if weight.ndim == 0:
            raise bad_shape("weight_norm()", label, weight.shape, "at least one dimension")
        if dim is not None:
            check_dim(dim, weight, f"weight_norm() on {label}")
    register_parametrization(module, name, WeightNorm(dim))
    add_load_hook(module, functools.partial(load_weight_norm, WeightNorm, name))
    return module
