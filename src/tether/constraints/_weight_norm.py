"""Weight normalization: a tensor as a magnitude times a unit direction."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from torch import Tensor, nn

from tether._checks import bad_shape, describe, where
from tether._parametrization_list import plists_of
from tether.functional import norm_except_dim, weight_normalize
from tether.parametrize import register_parametrization

__all__ = ["WeightNorm", "weight_norm"]

M = TypeVar("M", bound=nn.Module)

# Note [Loading the checkpoints of torch's hook-based norms]
#     torch.nn.utils.weight_norm and torch.nn.utils.spectral_norm, the hook-based versions
#     that predate parametrizations, store ``weight_g``, ``weight_v`` and ``weight_orig``,
#     ``weight_u``, ``weight_v``. Module.load_state_dict hands a child only the keys under
#     its own prefix, so the parametrization cannot see these keys; the registering function
#     therefore adds a load_state_dict pre-hook on the module that renames them to the
#     parametrization's keys before the children load. The hook is a functools.partial of a
#     module-level function, so parametrized models still pickle and deepcopy, and it does
#     nothing once the parametrization is removed. The earliest spectral_norm format (before
#     its version 1: a ``weight`` buffer and no ``weight_v``) is not converted; such keys are
#     reported as unexpected.


def first_parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The first parametrization on ``module.<name>``, or ``None`` if it is not parametrized."""
    plist = plists_of(module).get(name)
    return None if plist is None or len(plist) == 0 else plist[0]


def add_load_hook(module: nn.Module, hook: functools.partial[None]) -> None:
    """Register a load_state_dict pre-hook on ``module`` unless an equal one is there."""
    for existing in module._load_state_dict_pre_hooks.values():
        other = getattr(existing, "hook", None)
        if (
            isinstance(other, functools.partial)
            and other.func is hook.func
            and other.args == hook.args
        ):
            return
    module.register_load_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]  # untyped in torch


def check_dim(dim: object, weight: Tensor, who: str) -> None:
    """Raise torch's errors for a ``dim`` that is not an int or is out of range.

    ``who`` starts the message, e.g. ``"weight_norm() on Linear.weight"``.
    """
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{who}: `dim` must be an int or None; got {describe(dim)}.")
    ndim = max(weight.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{who}: dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
            f"but got {dim}); the tensor has shape {tuple(weight.shape)}."
        )


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
            raise TypeError(f"WeightNorm: `dim` must be an int or None; got {describe(dim)}.")
        self.dim = -1 if dim is None else dim

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_normalize(weight_g, weight_v, self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
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
        TypeError: ``dim`` is not an int or ``None``.
        IndexError: ``dim`` is out of range for the tensor.

    Example:
        >>> import torch, tether
        >>> layer = tether.weight_norm(torch.nn.Linear(20, 40))
        >>> list(layer.state_dict())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
    """
    weight = getattr(module, name, None)
    if isinstance(weight, Tensor):
        label = where(module, name)
        if weight.ndim == 0:
            raise bad_shape("weight_norm()", label, weight.shape, "at least one dimension")
        if dim is not None:
            check_dim(dim, weight, f"weight_norm() on {label}")
    register_parametrization(module, name, WeightNorm(dim))
    add_load_hook(module, functools.partial(_load_legacy_weight_norm, name))
    return module


def _load_legacy_weight_norm(
    name: str,
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Rename ``weight_g``, ``weight_v`` to ``original0``, ``original1`` (Note [Loading ...])."""
    if not isinstance(first_parametrization(module, name), WeightNorm):
        return
    g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
    if g_key in state_dict and v_key in state_dict:
        block = f"{prefix}parametrizations.{name}."
        state_dict[block + "original0"] = state_dict.pop(g_key)
        state_dict[block + "original1"] = state_dict.pop(v_key)
