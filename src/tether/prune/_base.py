"""``BasePruningMethod`` and ``PruningContainer``: the method classes of ``torch.nn.utils.prune``.

A pruning method decides which entries of a tensor to zero (``compute_mask``); its classmethod
``apply`` puts a module's tensor under that mask. The names, arguments and results are those of
``torch.nn.utils.prune``, so PyTorch's recipe for a new method (subclass
:class:`BasePruningMethod`, set ``PRUNING_TYPE``, write ``compute_mask``, call ``apply``) works
unchanged. What differs is where the mask lives: in a :class:`~tether.prune.PruningMask`
parametrization (``state_dict`` keys ``parametrizations.<name>.original`` and
``parametrizations.<name>.0.mask``) instead of torch's forward pre-hook with ``<name>_orig`` and
``<name>_mask``. The method object that torch keeps as the hook is kept on the
:class:`~tether.prune.PruningMask` as ``method``.

Note [Pruning again]
    The first pruning of a tensor calls ``compute_mask(t, default_mask)`` on the whole tensor,
    with a mask of ones. Every later pruning goes through a :class:`PruningContainer`, as in
    PyTorch: the new method sees only what is still unpruned (the unpruned entries, flattened,
    for ``"unstructured"``; the channels with an unpruned entry for ``"structured"``;
    everything for ``"global"``), so ``amount`` counts what is left, and the container keeps
    the methods applied so far, in order.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from tether._checks import describe, expect_same_shape
from tether.prune._apply import (
    call_label,
    check_not_meta,
    checked_mask,
    checked_scores,
    errors_prefixed,
    store,
    value_and_mask,
)
from tether.prune._mask import find_mask
from tether.prune._remove import remove

__all__ = ["BasePruningMethod", "PruningContainer", "channel_dim", "merge", "prune_tensor"]


class BasePruningMethod(abc.ABC):
    """The base class of pruning methods: subclass it to write a new one, as in PyTorch.

    A subclass sets ``PRUNING_TYPE`` and implements :meth:`compute_mask`; it gets
    :meth:`apply` (prune a module's tensor), :meth:`prune` (prune a tensor) and
    :meth:`remove` for free. ``PRUNING_TYPE`` says what a later pruning of the same tensor
    acts on (Note [Pruning again] in ``tether/prune/_base.py``): ``"unstructured"`` (single
    entries), ``"structured"`` (whole channels along the method's ``dim`` attribute) or
    ``"global"`` (the whole tensor, for masks given whole). The same as
    ``torch.nn.utils.prune.BasePruningMethod``, except that :meth:`apply` registers a
    :class:`~tether.prune.PruningMask` parametrization instead of a forward pre-hook.

    Attributes:
        PRUNING_TYPE: ``"unstructured"``, ``"structured"`` or ``"global"``.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> class EveryOther(prune.BasePruningMethod):
        ...     PRUNING_TYPE = "unstructured"
        ...     def compute_mask(self, t, default_mask):
        ...         mask = default_mask.clone()
        ...         mask.view(-1)[::2] = 0
        ...         return mask
        >>> layer = torch.nn.Linear(3, 2)
        >>> method = EveryOther.apply(layer, "bias")
        >>> layer.bias_mask
        tensor([0., 1.])
    """

    PRUNING_TYPE: str
    _tensor_name: str | None = None

    @abc.abstractmethod
    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """The mask that prunes ``t`` on top of ``default_mask``.

        Args:
            t: the importance scores of the entries (usually the tensor itself).
            default_mask: the mask so far, of ``t``'s shape (all ones on a tensor not yet
                pruned); entries pruned there must stay pruned.

        Returns:
            The new mask, of ``t``'s shape: 0 where pruned, 1 where kept.
        """

    @classmethod
    def apply(
        cls,
        module: nn.Module,
        name: str,
        *args: Any,
        importance_scores: Tensor | None = None,
        **kwargs: Any,
    ) -> BasePruningMethod:
        """Prune ``module.<name>`` with ``cls(*args, **kwargs)``, on top of earlier pruning.

        On the first pruning the tensor gets a :class:`~tether.prune.PruningMask`; pruning
        it again updates that mask through a :class:`PruningContainer` (Note [Pruning again]
        in ``tether/prune/_base.py``). As ``torch.nn.utils.prune.BasePruningMethod.apply``.

        Args:
            module: the module holding the tensor.
            name: the name of a parameter, buffer or parametrized tensor of ``module``.
            args: the positional arguments of ``cls``, e.g. ``amount``.
            importance_scores: rank the entries by these scores (a tensor of the tensor's
                shape) instead of the tensor's own values.
            kwargs: the keyword arguments of ``cls``.

        Returns:
            The method now pruning the tensor: the new method on a first pruning, else the
            :class:`PruningContainer` of all the methods applied to it.

        Raises:
            AttributeError: ``module`` has no attribute ``name``.
            TypeError: ``module.<name>`` is not a tensor, or ``compute_mask`` returned no
                tensor.
            ValueError: ``importance_scores`` or the computed mask has the wrong shape.

        Example:
            >>> import torch
            >>> from tether import prune
            >>> layer = torch.nn.Linear(4, 3)
            >>> method = prune.L1Unstructured.apply(layer, "weight", amount=0.5)
            >>> method = prune.RandomStructured.apply(layer, "weight", amount=1, dim=0)
            >>> [type(m).__name__ for m in method]
            ['L1Unstructured', 'RandomStructured']
        """
        return prune_tensor(
            cls, f"{cls.__name__}.apply", module, name, args, kwargs, importance_scores
        )

    def apply_mask(self, module: nn.Module) -> Tensor:
        """The pruned tensor: ``module.<name>_orig`` times ``module.<name>_mask``.

        ``module.<name>`` gives the same value; this is the computation spelled out, as in
        ``torch.nn.utils.prune``.

        Raises:
            ValueError: the method was not applied to a tensor of ``module``.
        """
        name = self._tensor_name
        if name is None or find_mask(module, name) is None:
            raise ValueError(
                f"{type(self).__name__}.apply_mask({type(module).__name__}): this method prunes "
                f"no tensor of the module (its tensor name is {name!r}). Call "
                f"{type(self).__name__}.apply(module, name, ...) first."
            )
        mask: Tensor = getattr(module, f"{name}_mask")
        original: Tensor = getattr(module, f"{name}_orig")
        return mask.to(dtype=original.dtype) * original

    def prune(
        self,
        t: Tensor,
        default_mask: Tensor | None = None,
        importance_scores: Tensor | None = None,
    ) -> Tensor:
        """Return ``t`` pruned by this method: ``t * compute_mask(...)``.

        Args:
            t: the tensor to prune.
            default_mask: the mask so far (entries at 0 stay pruned); all ones if None.
            importance_scores: rank the entries by these (of ``t``'s shape) instead of ``t``.

        Raises:
            ValueError: ``importance_scores`` does not have ``t``'s shape.

        Example:
            >>> import torch
            >>> from tether import prune
            >>> prune.L1Unstructured(amount=2).prune(torch.tensor([3.0, -1.0, 0.5, 2.0]))
            tensor([3., -0., 0., 2.])
        """
        scores = t
        if importance_scores is not None:
            expect_same_shape(
                t.shape,
                importance_scores.shape,
                f"{type(self).__name__}.prune: importance_scores must have the shape of t.",
                "Pass one score per entry of t, or None to rank by t itself.",
            )
            scores = importance_scores
        mask = torch.ones_like(t) if default_mask is None else default_mask
        return t * self.compute_mask(scores, default_mask=mask)

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent, as :func:`tether.prune.remove` on this method's tensor.

        Raises:
            ValueError: the method prunes no tensor of ``module``.
        """
        name = self._tensor_name
        if name is None:
            raise ValueError(
                f"{type(self).__name__}.remove({type(module).__name__}): this method was never "
                f"applied, so there is no pruning to remove. Use "
                "tether.prune.remove(module, name) to name the tensor."
            )
        remove(module, name)


class PruningContainer(BasePruningMethod):
    """The pruning methods applied to one tensor, in order: how iterative pruning combines.

    :meth:`compute_mask` applies the last method to what the mask has not pruned yet (Note
    [Pruning again] in ``tether/prune/_base.py``). Pruning a tensor twice makes one of these,
    kept on the tensor's :class:`~tether.prune.PruningMask` as ``method``; it can also be
    built by hand. As ``torch.nn.utils.prune.PruningContainer``.

    Args:
        args: the pruning methods, all acting on the same tensor name.

    Raises:
        TypeError: an argument is not a :class:`BasePruningMethod`.
        ValueError: the methods act on tensors of different names.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> container = prune.PruningContainer(prune.L1Unstructured(amount=1))
        >>> t = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
        >>> container.compute_mask(t, default_mask=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[1., 0.],
                [1., 0.]])
    """

    def __init__(self, *args: BasePruningMethod) -> None:
        self._pruning_methods: tuple[BasePruningMethod, ...] = ()
        for method in args:
            self.add_pruning_method(method)

    def add_pruning_method(self, method: BasePruningMethod) -> None:
        """Append ``method``; the first one added names the container's tensor if unnamed.

        Raises:
            TypeError: ``method`` is not a :class:`BasePruningMethod`.
            ValueError: ``method`` acts on another tensor name than the container.
        """
        if not isinstance(method, BasePruningMethod):
            raise TypeError(
                f"PruningContainer holds pruning methods (subclasses of "
                f"tether.prune.BasePruningMethod); got {describe(method)}."
            )
        if self._tensor_name is None:
            self._tensor_name = method._tensor_name
        elif method._tensor_name != self._tensor_name:
            raise ValueError(
                f"This PruningContainer holds the methods pruning {self._tensor_name!r}; the "
                f"method added prunes {method._tensor_name!r}. Keep one container per tensor."
            )
        self._pruning_methods += (method,)

    def __len__(self) -> int:
        return len(self._pruning_methods)

    def __iter__(self) -> Any:
        return iter(self._pruning_methods)

    def __getitem__(self, index: int) -> BasePruningMethod:
        return self._pruning_methods[index]

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """The last method's mask, computed on what ``default_mask`` has not pruned yet.

        Raises:
            IndexError: the container is empty.
        """
        if not self._pruning_methods:
            raise IndexError(
                "This PruningContainer is empty: add a method with add_pruning_method() "
                "before computing a mask."
            )
        return merge(self._pruning_methods[-1], t, default_mask)

    def __repr__(self) -> str:
        return f"PruningContainer({', '.join(map(repr, self._pruning_methods))})"


def channel_dim(t: Tensor, dim: int) -> int:
    """``dim`` as a non-negative index of the channel dimension of ``t``, validated."""
    if t.dim() < 2:
        raise ValueError(
            f"structured pruning removes whole channels, so it needs a tensor of 2 or more "
            f"dimensions; got shape {tuple(t.shape)}. Use l1_unstructured or "
            "random_unstructured on vectors."
        )
    if not -t.dim() <= dim < t.dim():
        raise IndexError(
            f"dim={dim} is out of range for a tensor of shape {tuple(t.shape)}; pass a dim in "
            f"[{-t.dim()}, {t.dim() - 1}] (dim=0 prunes output channels of Linear and Conv)."
        )
    return dim % t.dim()


def merge(method: object, t: Tensor, mask: Tensor) -> Tensor:
    """The mask after pruning ``t`` with ``method`` on top of the current ``mask``.

    The method sees only what ``mask`` has not pruned yet (Note [Pruning again] in
    ``tether/prune/_base.py``), so pruning ``t`` twice by 50% leaves 25% of it. Works with
    tether's methods and with torch's (the same protocol).

    Args:
        method: the pruning method to apply: ``PRUNING_TYPE`` and ``compute_mask``.
        t: the importance scores (usually the current, pruned, tensor), of ``mask``'s shape.
        mask: the current mask, all ones for a tensor not yet pruned.

    Returns:
        The new mask, in ``t``'s dtype.
    """
    kind = getattr(method, "PRUNING_TYPE", None)
    index: tuple[Tensor | slice, ...]
    if kind == "unstructured":
        index = (mask == 1,)
    elif kind == "structured":
        dim = getattr(method, "dim", None)
        if not isinstance(dim, int):
            raise AttributeError(
                f"{type(method).__name__} is a structured pruning method, so it needs an int "
                "attribute `dim` (the dimension of its channels)."
            )
        dim = channel_dim(t, dim)
        alive = mask.sum(dim=[d for d in range(t.dim()) if d != dim]) != 0
        index = (*[slice(None)] * dim, alive)
    elif kind == "global":
        index = (slice(None),) * t.dim()
    else:
        raise ValueError(
            f"{type(method).__name__} has PRUNING_TYPE={kind!r}; a pruning method needs "
            "'unstructured', 'structured' or 'global'."
        )
    new = mask.to(dtype=t.dtype, copy=True)
    part = method.compute_mask(t[index], default_mask=mask[index])  # type: ignore[attr-defined]  # checked by PRUNING_TYPE's protocol
    new[index] = part.to(dtype=new.dtype)
    return new


def _history(
    found: BasePruningMethod | None, method: BasePruningMethod, name: str
) -> PruningContainer:
    """The container of the methods applied to tensor ``name``, ending with ``method``."""
    if isinstance(found, PruningContainer) and found._tensor_name == name:
        found.add_pruning_method(method)
        return found
    container = PruningContainer()
    container._tensor_name = name
    if isinstance(found, BasePruningMethod) and found._tensor_name == name:
        container.add_pruning_method(found)
    container.add_pruning_method(method)
    return container


def prune_tensor(
    cls: type[BasePruningMethod],
    function: str,
    module: nn.Module,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    importance_scores: Tensor | None,
) -> BasePruningMethod:
    """Prune ``module.<name>`` with ``cls(*args, **kwargs)``: the body of :meth:`apply`.

    ``function`` names the call in error messages (``"l1_unstructured"``). Nothing changes on
    the module unless the mask was computed without error.
    """
    with errors_prefixed(call_label(function, module, name)):
        value, mask = value_and_mask(module, name)
        method = cls(*args, **kwargs)
        method._tensor_name = name
        scores = value if importance_scores is None else checked_scores(importance_scores, value)
        check_not_meta(scores, module, name, method)
        found = find_mask(module, name)
        with torch.no_grad():
            if found is None:
                new = method.compute_mask(scores, default_mask=mask)
            else:
                new = merge(method, scores, mask)
        new = checked_mask(new, value, method)
        applied = method if found is None else _history(found[2].method, method, name)
        store(module, name, new, applied)
    return applied
