"""``module.<name>_mask`` and ``module.<name>_orig`` on tether-pruned modules, as in PyTorch.

Code written for ``torch.nn.utils.prune`` reads the mask and the unpruned tensor under these
names. tether stores them elsewhere (``module.parametrizations.<name>.original`` and the mask
buffer of the :class:`~tether.prune.PruningMask`), so that the ``state_dict`` layout is
tether's; reading the old names is served by a lookup that runs only when normal attribute
lookup fails. They are read-only views: neither name is a parameter, a buffer or a
``state_dict`` key.
"""

from __future__ import annotations

from torch import Tensor, nn

from tether import _classes
from tether.prune._mask import find_mask, value_through

__all__ = ["torch_pruning_attribute"]

_SUFFIXES = ("_mask", "_orig")


def torch_pruning_attribute(module: nn.Module, attribute: str) -> Tensor:
    """``module.<name>_mask`` (the mask) or ``module.<name>_orig`` (the tensor before it).

    The original is the ``Parameter`` itself when the mask is the first parametrization (so
    its ``.grad`` and in-place edits are those of the trained tensor), else the value entering
    the mask.

    Raises:
        AttributeError: ``attribute`` is not of this form, or the tensor is not pruned.
    """
    name, suffix = attribute[:-5], attribute[-5:]
    if suffix not in _SUFFIXES or "_modules" not in module.__dict__:
        raise AttributeError(attribute)
    found = find_mask(module, name)
    if found is None:
        raise AttributeError(attribute)
    plist, index, pruning = found
    if suffix == "_mask":
        return pruning.mask
    if index == 0:
        original: Tensor = plist.original
        return original
    return value_through(plist, index - 1)


if torch_pruning_attribute not in _classes.attribute_fallbacks:
    _classes.attribute_fallbacks.append(torch_pruning_attribute)
