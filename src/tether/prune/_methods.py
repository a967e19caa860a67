"""The mask computations: which entries or channels each pruning method zeroes.

Every method follows the protocol of ``torch.nn.utils.prune``'s methods, so that the two can
be swapped in :func:`tether.prune.global_unstructured`: a ``PRUNING_TYPE`` (``"unstructured"``,
``"structured"`` or ``"global"``) and ``compute_mask(t, default_mask)``, which returns the
mask to apply to ``t`` on top of ``default_mask``. :func:`merge` applies a method to the part
of a tensor that is still unpruned, which is how repeated pruning of one tensor works.

Note [Masks equal to PyTorch's]
    tether promises the masks of ``torch.nn.utils.prune`` for the same inputs, random methods
    included under the same seed. Three things decide them, and each is reproduced here:

    * The number pruned: an int ``amount`` is a count; a float is a fraction, turned into a
      count with Python's ``round`` (which rounds halves to even) of ``amount * size``, where
      ``size`` counts the entries (or channels) that are *still unpruned*.
    * The random draws. Unstructured random pruning draws one uniform number per unpruned
      entry with ``torch.rand_like`` (so in the tensor's dtype and device, from that device's
      generator) and prunes the ``k`` largest. Structured random pruning draws one number per
      unpruned channel with ``torch.rand(n)``: on the CPU generator, in the default dtype,
      whatever the tensor's device; it keeps the channels whose draw exceeds the ``k``-th
      smallest. No draw happens when nothing is to be pruned, so the generator advances
      exactly as it does in PyTorch.
    * Ties. Entries with equal scores are ranked by ``torch.topk`` on the same vector
      PyTorch ranks: the unpruned entries flattened in row-major order (unstructured), or the
      norms of the unpruned channels (structured). ``topk`` breaks ties the same way on the
      same input, so the masks agree even on tensors with many equal magnitudes.
"""

from __future__ import annotations

import numbers
from typing import Protocol

import torch
from torch import Tensor

from tether._checks import describe, expect_same_shape

__all__ = [
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "PruningMethod",
    "RandomStructured",
    "RandomUnstructured",
    "check_amount",
    "merge",
]


class PruningMethod(Protocol):
    """What :func:`merge` needs of a method: tether's, or a subclass of torch's."""

    PRUNING_TYPE: str

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor: ...


def check_amount(amount: object) -> None:
    """Check that ``amount`` is a count (int >= 0) or a fraction (float in [0, 1])."""
    if not isinstance(amount, numbers.Real):
        raise TypeError(
            f"amount must be an int (how many to prune) or a float in [0, 1] (the fraction to "
            f"prune); got {describe(amount)}. Example: amount=0.3 prunes 30%."
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(
                f"amount={amount} is negative; it should be an int >= 0 (how many to prune) or "
                "a float in [0, 1] (the fraction to prune)."
            )
    elif not 0.0 <= float(amount) <= 1.0:
        raise ValueError(
            f"amount={amount} is out of range; a float amount is the fraction to prune and "
            "must lie in [0, 1] (an int amount is a count). Example: amount=0.3 prunes 30%."
        )


def _count(amount: int | float, size: int, units: str) -> int:
    """How many of ``size`` units to prune (Note [Masks equal to PyTorch's])."""
    if isinstance(amount, numbers.Integral):
        count = int(amount)
        if count > size:
            raise ValueError(
                f"amount={amount} asks to prune more {units} than the {size} still unpruned. "
                f"Pass an int of at most {size}, or a fraction such as amount=0.5."
            )
        return count
    return round(float(amount) * size)


def _zero_ranked(default_mask: Tensor, ranking: Tensor, count: int, largest: bool) -> Tensor:
    """``default_mask`` with the ``count`` entries ranked first by ``ranking`` set to zero."""
    mask = default_mask.clone(memory_format=torch.contiguous_format)
    if count:
        chosen = torch.topk(ranking.reshape(-1), k=count, largest=largest).indices
        mask.view(-1)[chosen] = 0
    return mask


def _channel_dim(t: Tensor, dim: int) -> int:
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


def _channels(t: Tensor, dim: int, kept: Tensor) -> Tensor:
    """A mask like ``t``: ones on the channels ``kept`` (indices) along ``dim``, zeros elsewhere."""
    return torch.zeros_like(t).index_fill_(dim, kept.to(t.device), 1)


class Identity:
    """Prunes nothing: the mask stays as it is (all ones on a tensor not yet pruned)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        return default_mask


class RandomUnstructured:
    """Prunes ``amount`` of the unpruned entries, chosen uniformly at random.

    The method behind :func:`tether.prune.random_unstructured`; pass the class as
    ``pruning_method`` to :func:`tether.prune.global_unstructured`. Draws as
    ``torch.nn.utils.prune.RandomUnstructured`` does, so the masks agree under the same seed.

    Args:
        amount: how many entries to prune (int) or the fraction of them (float in [0, 1]).

    Raises:
        TypeError: ``amount`` is not a number.
        ValueError: ``amount`` is negative, or a float above 1.

    Example:
        >>> import torch
        >>> from tether.prune import RandomUnstructured
        >>> mask = RandomUnstructured(amount=3).compute_mask(torch.randn(2, 4), torch.ones(2, 4))
        >>> int((mask == 0).sum())
        3
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        check_amount(amount)
        self.amount = amount

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        count = _count(self.amount, t.numel(), "entries")
        # No draw when nothing is pruned, so the generator moves as in PyTorch.
        draws = torch.rand_like(t) if count else t
        return _zero_ranked(default_mask, draws, count, largest=True)

    def __repr__(self) -> str:
        return f"RandomUnstructured(amount={self.amount!r})"


class L1Unstructured:
    """Prunes ``amount`` of the unpruned entries, those of smallest magnitude.

    The method behind :func:`tether.prune.l1_unstructured`; pass the class as
    ``pruning_method`` to :func:`tether.prune.global_unstructured`. Ties are broken as in
    ``torch.nn.utils.prune.L1Unstructured`` (Note [Masks equal to PyTorch's]).

    Args:
        amount: how many entries to prune (int) or the fraction of them (float in [0, 1]).

    Raises:
        TypeError: ``amount`` is not a number.
        ValueError: ``amount`` is negative, or a float above 1.

    Example:
        >>> import torch
        >>> from tether.prune import L1Unstructured
        >>> t = torch.tensor([[0.5, -0.1], [2.0, 0.3]])
        >>> L1Unstructured(amount=0.5).compute_mask(t, torch.ones(2, 2))
        tensor([[1., 0.],
                [1., 0.]])
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        check_amount(amount)
        self.amount = amount

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        count = _count(self.amount, t.numel(), "entries")
        return _zero_ranked(default_mask, t.abs(), count, largest=False)

    def __repr__(self) -> str:
        return f"L1Unstructured(amount={self.amount!r})"


class RandomStructured:
    """Prunes ``amount`` of the unpruned channels along ``dim``, chosen uniformly at random."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, dim: int = -1) -> None:
        check_amount(amount)
        self.amount = amount
        self.dim = dim

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        dim = _channel_dim(t, self.dim)
        size = t.shape[dim]
        count = _count(self.amount, size, "channels")
        if count == 0:
            return default_mask
        # One draw per channel, on the CPU in the default dtype (Note [Masks equal to
        # PyTorch's]); the channels above the count-th smallest draw are kept.
        draws = torch.rand(size)
        kept = (draws > torch.kthvalue(draws, count).values).nonzero().flatten()
        return _channels(t, dim, kept) * default_mask.to(dtype=t.dtype)


class LnStructured:
    """Prunes ``amount`` of the unpruned channels along ``dim``, those of smallest Ln norm."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, n: int | float | str, dim: int = -1) -> None:
        check_amount(amount)
        if isinstance(n, bool) or not isinstance(n, (numbers.Real, str)):
            raise TypeError(
                f"n must be the order of the norm, as torch.norm's p: a number (1, 2, "
                f"float('inf'), ...) or 'fro' or 'nuc'; got {describe(n)}."
            )
        self.amount = amount
        self.n = n
        self.dim = dim

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        dim = _channel_dim(t, self.dim)
        size = t.shape[dim]
        count = _count(self.amount, size, "channels")
        others = [d for d in range(t.dim()) if d != dim]
        # torch.norm, as PyTorch's pruning uses: the same p values, and the same norms bit for
        # bit, so that the ranking (and its ties) agree.
        norms = torch.norm(t, p=self.n, dim=others)
        if count == 0:
            return default_mask
        kept = torch.topk(norms, k=size - count, largest=True).indices
        return _channels(t, dim, kept) * default_mask.to(dtype=t.dtype)


class CustomFromMask:
    """Multiplies a given mask into the current one."""

    PRUNING_TYPE = "global"

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor of zeros and ones; got {describe(mask)}.")
        self.mask = mask

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        expect_same_shape(
            default_mask.shape,
            self.mask.shape,
            "the mask has the wrong shape.",
            "Pass a mask of the tensor's shape, 0 where pruned and 1 where kept.",
        )
        mask = self.mask.to(dtype=default_mask.dtype, device=default_mask.device)
        return default_mask * mask


def merge(method: PruningMethod, t: Tensor, mask: Tensor) -> Tensor:
    """The mask after pruning ``t`` with ``method`` on top of the current ``mask``.

    The method sees only what ``mask`` has not pruned yet: the entries where the mask is 1
    (unstructured methods), the channels that still have a nonzero entry (structured), or
    everything (global, for masks given whole). So ``amount`` counts what is left, and pruning
    ``t`` twice by 50% leaves 25% of it, as in PyTorch's iterative pruning.

    Args:
        method: the pruning method to apply.
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
        dim = _channel_dim(t, dim)
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
    new[index] = method.compute_mask(t[index], default_mask=mask[index]).to(dtype=new.dtype)
    return new
