"""Making pruning permanent (``remove``), and telling whether a model is pruned (``is_pruned``)."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from tether._checks import describe, tensor_label
from tether._parametrization_list import plists_of
from tether.parametrize import remove_parametrizations
from tether.prune._checkpoint import drop_torch_keys_hook
from tether.prune._mask import PruningMask, find_mask

__all__ = ["is_pruned", "remove"]

M = TypeVar("M", bound=nn.Module)


def remove(module: M, name: str) -> M:
    """Make the pruning of ``module.<name>`` permanent: a plain tensor, zero where pruned.

    As ``torch.nn.utils.prune.remove``: the pruned values are written into the original
    ``Parameter``, which becomes ``module.<name>`` again, the same object (an optimizer built
    before still trains it), and the mask is dropped. Pruned entries are zero but, without the
    mask, training may change them again.

    If other parametrizations act on the tensor, only the mask is removed: this works when the
    mask comes first in the chain (the pruned values go into the original); a mask after
    another parametrization cannot be folded into anything, and
    :func:`tether.remove_parametrizations` removes the whole chain instead.

    Args:
        module: the module holding the pruned tensor.
        name: the pruned tensor's name.

    Returns:
        ``module``.

    Raises:
        ValueError: ``module.<name>`` is not pruned, or its mask follows another
            parametrization.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = torch.nn.Linear(5, 7)
        >>> weight = layer.weight
        >>> layer = prune.remove(prune.l1_unstructured(layer, "weight", 0.2), "weight")
        >>> type(layer).__name__, layer.weight is weight, int((weight == 0).sum())
        ('Linear', True, 7)
    """
    if not isinstance(module, nn.Module) or not isinstance(name, str):
        raise TypeError(
            f"remove() needs a module and a tensor name; got {describe(module)} and "
            f"{describe(name)}. Example: tether.prune.remove(layer, 'weight')."
        )
    label = tensor_label(module, name)
    found = find_mask(module, name)
    if found is None:
        pruned = [n for n in plists_of(module) if find_mask(module, n) is not None]
        known = ", ".join(repr(n) for n in pruned) or "none"
        raise ValueError(
            f"Cannot remove the pruning of {label}: it is not pruned. Pruned tensors of this "
            f"module: {known}."
        )
    plist, index, pruning = found
    if len(plist) == 1:
        remove_parametrizations(module, name)
    elif index == 0:
        with torch.no_grad():
            plist.original.mul_(pruning.mask.to(dtype=plist.original.dtype))
        del plist[0]  # the chain drops its cached values
    else:
        before = ", ".join(type(p).__name__ for p in list(plist)[:index])
        raise ValueError(
            f"Cannot remove the pruning of {label} alone: its mask comes after {before}, so "
            "the pruned values cannot be written into the original. Use "
            f"tether.remove_parametrizations(module, {name!r}) to make the whole chain "
            "permanent, or prune before registering the other parametrizations."
        )
    if not any(find_mask(module, n) is not None for n in plists_of(module)):
        drop_torch_keys_hook(module)
    return module


def is_pruned(module: nn.Module) -> bool:
    """Whether ``module`` or any of its submodules has a pruned tensor (a :class:`PruningMask`).

    As ``torch.nn.utils.prune.is_pruned``, for pruning done by :mod:`tether.prune`.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(5, 7))
        >>> prune.is_pruned(net)
        False
        >>> _ = prune.random_unstructured(net[0], "weight", amount=0.2)
        >>> prune.is_pruned(net)
        True
    """
    return any(isinstance(m, PruningMask) for m in module.modules())
