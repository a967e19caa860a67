"""Applying a pruning method to a module's tensor: the steps every pruning function shares.

Find what is still unpruned (:func:`value_and_mask`), check the mask a method computed
(:func:`checked_mask`) and store it in the tensor's :class:`PruningMask`, registering one on the
first pruning (:func:`store`). Validation errors get the call and the tensor in front
(:func:`errors_prefixed`), e.g. ``l1_unstructured() on Linear.weight: amount=-1 is negative...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tether._checks import describe, expect_same_shape, tensor_label
from tether._parametrization_list import plists_of
from tether.parametrize import register_parametrization
from tether.prune._checkpoint import ensure_torch_keys_hook
from tether.prune._mask import PruningMask, find_mask, value_through

if TYPE_CHECKING:
    from tether.prune._base import BasePruningMethod

__all__ = [
    "call_label",
    "check_not_meta",
    "checked_mask",
    "checked_scores",
    "errors_prefixed",
    "store",
    "value_and_mask",
]


@contextlib.contextmanager
def errors_prefixed(what: str) -> Iterator[None]:
    """Prefix the validation errors raised inside with ``what`` (the call and the tensor)."""
    try:
        yield
    except (TypeError, ValueError, IndexError) as exc:
        raise type(exc)(f"{what}: {exc}") from None


def call_label(function: str, module: object, name: object) -> str:
    """How errors name the call and the tensor, e.g. ``"l1_unstructured() on Linear.weight"``."""
    if isinstance(module, nn.Module) and isinstance(name, str):
        return f"{function}() on {tensor_label(module, name)}"
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
            f"Cannot prune {tensor_label(module, name)}: {type(module).__name__} has no tensor "
            f"named {name!r}. Its tensors: {known}."
        ) from None
    if not isinstance(value, Tensor):
        raise TypeError(
            f"it is {describe(value)}, not a tensor (for a bias, the layer was built with "
            "bias=False). Prune a parameter or buffer of the module."
        )
    return value


def value_and_mask(module: nn.Module, name: str) -> tuple[Tensor, Tensor]:
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


def check_not_meta(scores: Tensor, module: nn.Module, name: str, method: object) -> None:
    """Refuse to compute a mask from a tensor on the meta device, which holds no values."""
    if scores.is_meta:
        # NotImplementedError, as torch's own kernels raise for data-dependent ops on meta.
        raise NotImplementedError(
            f"Cannot prune {tensor_label(module, name)} with {type(method).__name__} on the meta "
            "device: a tensor there holds no values, so no mask can be computed. Prune after "
            "giving the module real memory (module.to_empty(device=...), then "
            "reset_parameters())."
        )


def checked_mask(mask: object, value: Tensor, method: object) -> Tensor:
    """The mask a method computed, as a fresh tensor of ``value``'s dtype and device.

    A method written by the user may return anything; say which method went wrong and how.
    """
    owner = type(method).__name__
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{owner}.compute_mask returned {describe(mask)}; it must return the mask as a "
            "tensor of the shape of t (0 where pruned, 1 where kept)."
        )
    expect_same_shape(
        value.shape,
        mask.shape,
        f"{owner}.compute_mask returned a mask of the wrong shape.",
        "Return a mask of the shape of t, e.g. starting from default_mask.clone().",
    )
    return mask.to(dtype=value.dtype, device=value.device, copy=True)


def store(module: nn.Module, name: str, mask: Tensor, method: BasePruningMethod) -> None:
    """Put ``module.<name>`` under ``mask``: register a :class:`PruningMask`, or update it."""
    found = find_mask(module, name)
    if found is None:
        pruning = PruningMask(mask)
        pruning.method = method
        register_parametrization(module, name, pruning)
        ensure_torch_keys_hook(module)
        return
    plist, _, pruning = found
    with torch.no_grad():
        pruning.mask.copy_(mask)
    pruning.method = method
    plist.changed()  # the mask changed in place
