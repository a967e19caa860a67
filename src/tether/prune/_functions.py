"""The pruning functions, with the names, arguments and masks of ``torch.nn.utils.prune``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from tether._checks import describe
from tether.prune._apply import call_label, checked_scores, errors_prefixed, value_and_mask
from tether.prune._base import merge, prune_tensor
from tether.prune._methods import (
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    RandomStructured,
    RandomUnstructured,
)

__all__ = [
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
]

M = TypeVar("M", bound=nn.Module)


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
    prune_tensor(Identity, "identity", module, name, (), {}, None)
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
    prune_tensor(RandomUnstructured, "random_unstructured", module, name, (amount,), {}, None)
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
    prune_tensor(L1Unstructured, "l1_unstructured", module, name, (amount,), {}, importance_scores)
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
    prune_tensor(
        RandomStructured,
        "random_structured",
        module,
        name,
        (
            amount,
            dim,
        ),
        {},
        None,
    )
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
    prune_tensor(
        LnStructured,
        "ln_structured",
        module,
        name,
        (
            amount,
            n,
            dim,
        ),
        {},
        importance_scores,
    )
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
    prune_tensor(CustomFromMask, "custom_from_mask", module, name, (mask,), {}, None)
    return module


# Our functions name the method they apply; accept them where torch expects the class.
_METHOD_OF_FUNCTION: dict[object, type] = {
    l1_unstructured: L1Unstructured,
    random_unstructured: RandomUnstructured,
}


def global_unstructured(
    parameters: Iterable[tuple[nn.Module, str]],
    pruning_method: Callable[..., object],
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
    with errors_prefixed(who):
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
        with errors_prefixed(call_label("global_unstructured", module, name)):
            value, mask = value_and_mask(module, name)
            given = scores_of.get((module, name))
            scores.append(value if given is None else checked_scores(given, value))
            values.append(value)
            masks.append(mask)
    with torch.no_grad(), errors_prefixed(who):
        flat = merge(
            method,
            torch.cat([s.reshape(-1) for s in scores]),
            torch.cat([m.reshape(-1) for m in masks]),
        )
    start = 0
    for (module, name), value in zip(pairs, values, strict=True):
        part = flat[start : start + value.numel()].view_as(value)
        start += value.numel()
        prune_tensor(CustomFromMask, "global_unstructured", module, name, (part,), {}, None)
