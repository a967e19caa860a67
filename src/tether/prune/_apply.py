"""Applying a pruning method to a module's tensor: the steps every pruning function shares.

Find what is still unpruned (:func:`current`), run the method on it and store the merged mask
in the tensor's :class:`PruningMask`, registering one on the first pruning
(:func:`apply_method`). Validation errors get the call and the tensor in front
(:func:`about`), e.g. ``l1_unstructured() on Linear.weight: amount=-1 is negative...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from tether import _cache
from tether._checks import describe, expect_same_shape, where
from tether._parametrization_list import plists_of
from tether.parametrize import register_parametrization
from tether.prune._checkpoint import ensure_torch_keys_hook
from tether.prune._mask import PruningMask, find_mask, value_through
from tether.prune._methods import PruningMethod, merge

__all__ = ["about", "apply_method", "checked_scores", "context", "current"]


@contextlib.contextmanager
def about(what: str) -> Iterator[None]:
    """Prefix the validation errors raised inside with ``what`` (the call and the tensor)."""
    try:
        yield
    except (TypeError, ValueError, IndexError) as exc:
        raise type(exc)(f"{what}: {exc}") from None


def context(function: str, module: object, name: object) -> str:
    """How errors name the call and the tensor, e.g. ``"l1_unstructured() on Linear.weight"``."""
    if isinstance(module, nn.Module) and isinstance(name, str):
        return f"{function}() on {where(module, name)}"
    return f"{function}()"


def _tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` if it is a tensor, else the error torch's pruning would raise."""
    try:
        value = getattr(module, name)
    except AttributeError:
        tensors = [n for n, t in module.named_parameters(recurse=False) if t is not None]
        tensors += [n for n, t in module.named_buffers(recurse=False) if t is not None]
        tensors += [n for n in plists_of(module) if n not in tensors]
        known = ", ".join(repr(n) for n in tensors) or "none"
        raise AttributeError(
            f"Cannot prune {where(module, name)}: {type(module).__name__} has no tensor named "
            f"{name!r}. Its tensors: {known}."
        ) from None
    if not isinstance(value, Tensor):
        raise TypeError(
            f"it is {describe(value)}, not a tensor (for a bias, the layer was built with "
            "bias=False). Prune a parameter or buffer of the module."
        )
    return value


def current(module: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """The tensor where the mask acts (already masked if pruned) and the current mask."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"the module must be an nn.Module; got {describe(module)}.")
    if not isinstance(name, str):
        raise TypeError(f"name must be the tensor's name as a str; got {describe(name)}.")
    found = find_mask(module, name)
    with torch.no_grad():
        if found is None:
            value = _tensor(module, name).detach()
            return value, torch.ones_like(value)
        plist, index, pruning = found
        return value_through(plist, index), pruning.mask


def checked_scores(importance_scores: object, value: Tensor) -> Tensor:
    """``importance_scores``, detached and on ``value``'s device, if it is a tensor of its shape."""
    if not isinstance(importance_scores, Tensor):
        raise TypeError(
            f"importance_scores must be a tensor of the tensor's shape, or None (use the "
            f"tensor's own values); got {describe(importance_scores)}."
        )
    expect_same_shape(
        value.shape,
        importance_scores.shape,
        "importance_scores must have the shape of the tensor it ranks.",
        "Pass one score per entry, or None to rank by the tensor's own values.",
    )
    return importance_scores.detach().to(device=value.device)


def apply_method(
    module: nn.Module, name: str, method: PruningMethod, importance_scores: Tensor | None
) -> None:
    """Apply ``method`` to what is still unpruned of ``module.<name>`` and store the mask."""
    value, mask = current(module, name)
    scores = value if importance_scores is None else checked_scores(importance_scores, value)
    if scores.is_meta:
        # NotImplementedError, as torch's own kernels raise for data-dependent ops on meta.
        raise NotImplementedError(
            f"Cannot prune {where(module, name)} with {type(method).__name__} on the meta "
            "device: a tensor there holds no values, so no mask can be computed. Prune after "
            "giving the module real memory (module.to_empty(device=...), then "
            "reset_parameters())."
        )
    with torch.no_grad():
        new = merge(method, scores, mask).to(dtype=value.dtype, device=value.device)
    found = find_mask(module, name)
    if found is None:
        register_parametrization(module, name, PruningMask(new))
        ensure_torch_keys_hook(module)
        return
    plist, _, pruning = found
    with torch.no_grad():
        pruning.mask.copy_(new)
    _cache.invalidate(plist)
