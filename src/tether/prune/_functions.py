"""The pruning functions, with the names, arguments and masks of ``torch.nn.utils.prune``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from tether import _cache
from tether._checks import describe, where
from tether._parametrization_list import plists_of
from tether.parametrize import register_parametrization, remove_parametrizations
from tether.prune._checkpoint import drop_torch_keys_hook, ensure_torch_keys_hook
from tether.prune._mask import PruningMask, find_mask, value_through
from tether.prune._methods import (
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningMethod,
    RandomStructured,
    RandomUnstructured,
    merge,
)

__all__ = [
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
    "remove",
]

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def _about(what: str) -> Iterator[None]:
    """Prefix the validation errors raised inside with ``what`` (the call and the tensor)."""
    try:
        yield
    except (TypeError, ValueError, IndexError) as exc:
        raise type(exc)(f"{what}: {exc}") from None


def _context(function: str, module: object, name: object) -> str:
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


def _current(module: nn.Module, name: str) -> tuple[Tensor, Tensor]:
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


def _scores(importance_scores: object, value: Tensor) -> Tensor:
    if not isinstance(importance_scores, Tensor):
        raise TypeError(
            f"importance_scores must be a tensor of the tensor's shape, or None (use the "
            f"tensor's own values); got {describe(importance_scores)}."
        )
    if importance_scores.shape != value.shape:
        raise ValueError(
            "importance_scores must have the shape of the tensor it ranks.\n"
            f"  expected shape: {tuple(value.shape)}\n"
            f"  got shape:      {tuple(importance_scores.shape)}\n"
            "Pass one score per entry, or None to rank by the tensor's own values."
        )
    return importance_scores.detach().to(device=value.device)


def _prune(
    module: nn.Module, name: str, method: PruningMethod, importance_scores: Tensor | None
) -> None:
    """Apply ``method`` to what is still unpruned of ``module.<name>`` and store the mask."""
    value, mask = _current(module, name)
    scores = value if importance_scores is None else _scores(importance_scores, value)
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


def identity(module: M, name: str) -> M:
    """Prune nothing, but put ``module.<name>`` under a mask of ones.

    Afterwards the tensor is parametrized by a :class:`PruningMask` like any pruned tensor
    (useful to give every layer the same ``state_dict`` keys). On a pruned tensor, the mask
    stays as it is. As ``torch.nn.utils.prune.identity``.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.

    Returns:
        ``module``.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``module.<name>`` is not a tensor (a bias of ``None``).

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = prune.identity(torch.nn.Linear(2, 3), "bias")
        >>> layer.parametrizations.bias[0].mask
        tensor([1., 1., 1.])
    """
    with _about(_context("identity", module, name)):
        _prune(module, name, Identity(), None)
    return module


def random_unstructured(module: M, name: str, amount: int | float) -> M:
    """Prune ``amount`` of the unpruned entries of ``module.<name>``, chosen at random.

    Same arguments and, under the same seed, the same mask as
    ``torch.nn.utils.prune.random_unstructured`` (it draws from the tensor's device generator
    as PyTorch does). Pruning a pruned tensor again prunes among the entries still unpruned,
    so ``amount`` counts what is left.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.
        amount: how many entries to prune (int) or the fraction of the unpruned ones (float
            in [0, 1]).

    Returns:
        ``module``, with ``module.<name>`` parametrized by a :class:`PruningMask`.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``amount`` is not a number, or ``module.<name>`` is not a tensor.
        ValueError: ``amount`` is negative, a float above 1, or an int above the number of
            entries still unpruned.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = prune.random_unstructured(torch.nn.Linear(4, 5), "weight", amount=0.5)
        >>> int((layer.weight == 0).sum())
        10
    """
    with _about(_context("random_unstructured", module, name)):
        _prune(module, name, RandomUnstructured(amount), None)
    return module


def l1_unstructured(
    module: M, name: str, amount: int | float, importance_scores: Tensor | None = None
) -> M:
    """Prune ``amount`` of the unpruned entries of ``module.<name>``, the smallest in magnitude.

    Same arguments and masks as ``torch.nn.utils.prune.l1_unstructured``, ties included.
    Pruning a pruned tensor again prunes among the entries still unpruned: pruning twice by
    ``0.5`` leaves a quarter of the entries.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.
        amount: how many entries to prune (int) or the fraction of the unpruned ones (float
            in [0, 1]).
        importance_scores: rank the entries by the magnitude of these scores (a tensor of the
            tensor's shape) instead of the tensor's own values.

    Returns:
        ``module``, with ``module.<name>`` parametrized by a :class:`PruningMask`.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``amount`` is not a number, or ``module.<name>`` is not a tensor.
        ValueError: ``amount`` is negative, a float above 1, or an int above the number of
            entries still unpruned; ``importance_scores`` has the wrong shape.

    References:
        Learning both Weights and Connections for Efficient Neural Networks (Han, Pool, Tran
        and Dally, 2015). https://arxiv.org/abs/1506.02626

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.1, -2.0], [0.5, -0.2]]))
        >>> layer = prune.l1_unstructured(layer, "weight", amount=0.5)
        >>> layer.weight
        tensor([[ 0.0000, -2.0000],
                [ 0.5000, -0.0000]], grad_fn=<MulBackward0>)
        >>> list(layer.state_dict())
        ['bias', 'parametrizations.weight.original', 'parametrizations.weight.0.mask']
    """
    with _about(_context("l1_unstructured", module, name)):
        _prune(module, name, L1Unstructured(amount), importance_scores)
    return module


def random_structured(module: M, name: str, amount: int | float, dim: int) -> M:
    """Prune ``amount`` of the unpruned channels of ``module.<name>`` along ``dim``, at random.

    A channel is a slice ``t.select(dim, i)``: for the weight of a ``Linear`` or ``Conv2d``,
    ``dim=0`` prunes output units or filters, ``dim=1`` inputs. Same arguments and, under the
    same seed, the same mask as ``torch.nn.utils.prune.random_structured``: like PyTorch, it
    draws one number per channel from the CPU generator, whatever the tensor's device.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.
        amount: how many channels to prune (int) or the fraction of the channels still
            unpruned (float in [0, 1]).
        dim: the dimension indexing the channels.

    Returns:
        ``module``, with ``module.<name>`` parametrized by a :class:`PruningMask`.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``amount`` is not a number, or ``module.<name>`` is not a tensor.
        ValueError: ``amount`` is out of range, or the tensor has fewer than 2 dimensions.
        IndexError: ``dim`` is not a dimension of the tensor.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = prune.random_structured(torch.nn.Linear(5, 3), "weight", amount=3, dim=1)
        >>> int((layer.weight.abs().sum(dim=0) == 0).sum())
        3
    """
    with _about(_context("random_structured", module, name)):
        _prune(module, name, RandomStructured(amount, dim), None)
    return module


def ln_structured(
    module: M,
    name: str,
    amount: int | float,
    n: int | float | str,
    dim: int,
    importance_scores: Tensor | None = None,
) -> M:
    """Prune ``amount`` of the unpruned channels along ``dim``, those of smallest Ln norm.

    The norm of a channel ``t.select(dim, i)`` is ``torch.norm(channel, p=n)``. Same arguments
    and masks as ``torch.nn.utils.prune.ln_structured``. For a ``Conv2d`` weight of shape
    ``(out, in, kh, kw)``, ``dim=0`` removes whole filters, the usual choice to shrink a
    network.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.
        amount: how many channels to prune (int) or the fraction of the channels still
            unpruned (float in [0, 1]).
        n: the order of the norm, any ``p`` of :func:`torch.norm` (``1``, ``2``,
            ``float("inf")``, ``float("-inf")``, ``"fro"``, ``"nuc"``).
        dim: the dimension indexing the channels.
        importance_scores: rank the channels by the norms of these scores (a tensor of the
            tensor's shape) instead of the tensor's own values.

    Returns:
        ``module``, with ``module.<name>`` parametrized by a :class:`PruningMask`.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``amount`` or ``n`` has the wrong type, or ``module.<name>`` is not a
            tensor.
        ValueError: ``amount`` is out of range, the tensor has fewer than 2 dimensions, or
            ``importance_scores`` has the wrong shape.
        IndexError: ``dim`` is not a dimension of the tensor.

    References:
        Pruning Filters for Efficient ConvNets (Li, Kadav, Durdanovic, Samet and Graf, 2017).
        https://arxiv.org/abs/1608.08710

    Example:
        >>> import torch
        >>> from tether import prune
        >>> conv = prune.ln_structured(torch.nn.Conv2d(3, 4, 3), "weight", amount=2, n=2, dim=0)
        >>> (conv.weight.flatten(1).abs().sum(dim=1) == 0).tolist().count(True)
        2
    """
    with _about(_context("ln_structured", module, name)):
        _prune(module, name, LnStructured(amount, n, dim), importance_scores)
    return module


def custom_from_mask(module: M, name: str, mask: Tensor) -> M:
    """Prune the entries of ``module.<name>`` where ``mask`` is 0.

    On a pruned tensor the masks multiply, so entries pruned before stay pruned. As
    ``torch.nn.utils.prune.custom_from_mask``; the mask may have any dtype (bool, int, float)
    and device.

    Args:
        module: the module holding the tensor.
        name: the name of a parameter, buffer or parametrized tensor of ``module``.
        mask: a tensor of the tensor's shape, 0 where pruned and 1 where kept.

    Returns:
        ``module``, with ``module.<name>`` parametrized by a :class:`PruningMask`.

    Raises:
        AttributeError: ``module`` has no attribute ``name``.
        TypeError: ``mask`` is not a tensor, or ``module.<name>`` is not a tensor.
        ValueError: ``mask`` has the wrong shape.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> layer = prune.custom_from_mask(torch.nn.Linear(5, 3), "bias", torch.tensor([0, 1, 0]))
        >>> layer.parametrizations.bias[0].mask
        tensor([0., 1., 0.])
    """
    with _about(_context("custom_from_mask", module, name)):
        _prune(module, name, CustomFromMask(mask), None)
    return module


# Our functions name the method they apply; accept them where torch expects the class.
_METHOD_OF_FUNCTION: dict[object, type] = {
    l1_unstructured: L1Unstructured,
    random_unstructured: RandomUnstructured,
}


def global_unstructured(
    parameters: Iterable[tuple[nn.Module, str]],
    pruning_method: type | Callable[..., PruningMethod],
    importance_scores: dict[tuple[nn.Module, str], Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Prune the unpruned entries of several tensors together, ranked across all of them.

    Concatenates the tensors, applies ``pruning_method(**kwargs)`` to the entries still
    unpruned, and gives each tensor its part of the mask. With ``L1Unstructured`` the entries
    of smallest magnitude in the whole model go first, so layers are pruned unevenly: often
    better than pruning each layer by the same fraction. Same arguments and masks as
    ``torch.nn.utils.prune.global_unstructured``.

    Args:
        parameters: ``(module, name)`` pairs naming the tensors to prune.
        pruning_method: :class:`L1Unstructured` or :class:`RandomUnstructured` (or, as a
            shorthand, :func:`l1_unstructured` or :func:`random_unstructured`), or any class
            following the protocol of ``torch.nn.utils.prune.BasePruningMethod`` with
            ``PRUNING_TYPE = "unstructured"`` (torch's own classes work).
        importance_scores: scores to rank a tensor by instead of its values, as a dict from
            ``(module, name)`` pairs to tensors of the tensor's shape.
        kwargs: the arguments of ``pruning_method``, usually ``amount``: how many entries to
            prune in total (int) or the fraction of the unpruned ones (float in [0, 1]).

    Raises:
        TypeError: ``parameters`` is not an iterable of ``(module, name)`` pairs,
            ``importance_scores`` is not a dict, or the method is not unstructured.
        ValueError: ``parameters`` is empty, or ``amount`` is out of range.

    References:
        What is the State of Neural Network Pruning? (Blalock, Gonzalez Ortiz, Frankle and
        Guttag, 2020), which finds global magnitude pruning a strong baseline.
        https://arxiv.org/abs/2003.03033

    Example:
        >>> import torch
        >>> from tether import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
        >>> pairs = [(net[0], "weight"), (net[1], "weight")]
        >>> prune.global_unstructured(pairs, prune.L1Unstructured, amount=10)
        >>> int((net[0].weight == 0).sum() + (net[1].weight == 0).sum())
        10
    """
    who = "global_unstructured()"
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
        raise TypeError(
            f"{who} needs `parameters` as an iterable of (module, name) pairs; got "
            f"{describe(parameters)}. Example: [(net[0], 'weight'), (net[2], 'weight')]."
        )
    pairs = list(parameters)
    for item in pairs:
        if not (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], nn.Module)
            and isinstance(item[1], str)
        ):
            raise TypeError(
                f"{who} needs `parameters` as (module, name) pairs; got an item that is "
                f"{describe(item)}. Example: [(net[0], 'weight'), (net[2], 'weight')]."
            )
    if not pairs:
        raise ValueError(f"{who} needs at least one (module, name) pair in `parameters`.")
    scores_of = {} if importance_scores is None else importance_scores
    if not isinstance(scores_of, dict):
        raise TypeError(
            f"{who} needs `importance_scores` as a dict from (module, name) pairs to tensors, "
            f"or None; got {describe(importance_scores)}."
        )
    with _about(who):
        method = _METHOD_OF_FUNCTION.get(pruning_method, pruning_method)(**kwargs)
    if getattr(method, "PRUNING_TYPE", None) != "unstructured":
        raise TypeError(
            f"{who} works with unstructured pruning methods only (PRUNING_TYPE "
            f"'unstructured'); {pruning_method!r} gives PRUNING_TYPE "
            f"{getattr(method, 'PRUNING_TYPE', None)!r}. Use tether.prune.L1Unstructured or "
            "tether.prune.RandomUnstructured."
        )

    values, scores, masks = [], [], []
    for module, name in pairs:
        with _about(_context("global_unstructured", module, name)):
            value, mask = _current(module, name)
            given = scores_of.get((module, name))
            scores.append(value if given is None else _scores(given, value))
            values.append(value)
            masks.append(mask)
    with torch.no_grad(), _about(who):
        flat = merge(
            method,
            torch.cat([s.reshape(-1) for s in scores]),
            torch.cat([m.reshape(-1) for m in masks]),
        )
    start = 0
    for (module, name), value in zip(pairs, values, strict=True):
        part = flat[start : start + value.numel()].view_as(value)
        start += value.numel()
        with _about(_context("global_unstructured", module, name)):
            _prune(module, name, CustomFromMask(part), None)


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
    label = where(module, name)
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
        del plist[0]
        _cache.invalidate(plist)
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
