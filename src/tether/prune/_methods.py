"""The mask computations: which entries or channels each pruning method zeroes.

Each is a :class:`~tether.prune.BasePruningMethod` with the name, arguments and masks of its
counterpart in ``torch.nn.utils.prune``: a ``PRUNING_TYPE`` (``"unstructured"``,
``"structured"`` or ``"global"``) and ``compute_mask(t, default_mask)``, which returns the
mask to apply to ``t`` on top of ``default_mask``.

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

import torch
from torch import Tensor

from tether._checks import describe, expect_same_shape
from tether.prune._base import BasePruningMethod, channel_dim

__all__ = [
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "RandomStructured",
    "RandomUnstructured",
    "check_amount",
]


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


def _channels(t: Tensor, dim: int, kept: Tensor) -> Tensor:
    """A mask like ``t``: ones on the channels ``kept`` (indices) along ``dim``, zeros elsewhere."""
    return torch.zeros_like(t).index_fill_(dim, kept.to(t.device), 1)


class Identity(BasePruningMethod):
    """Prunes nothing: the mask stays as it is (all ones on a tensor not yet pruned).

    The method behind :func:`tether.prune.identity`, as ``torch.nn.utils.prune.Identity``.

    Example:
        >>> import torch
        >>> from tether.prune import Identity
        >>> Identity().compute_mask(torch.randn(3), torch.tensor([1.0, 0.0, 1.0]))
        tensor([1., 0., 1.])
    """

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        return default_mask

    def __repr__(self) -> str:
        return "Identity()"


class RandomUnstructured(BasePruningMethod):
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


class L1Unstructured(BasePruningMethod):
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


class RandomStructured(BasePruningMethod):
    """Prunes ``amount`` of the unpruned channels along ``dim``, chosen uniformly at random.

    The method behind :func:`tether.prune.random_structured`. A channel is a slice
    ``t.select(dim, i)``. Draws as ``torch.nn.utils.prune.RandomStructured`` does, so the
    masks agree under the same seed (Note [Masks equal to PyTorch's]).

    Args:
        amount: how many channels to prune (int) or the fraction of them (float in [0, 1]).
        dim: the dimension indexing the channels.

    Raises:
        TypeError: ``amount`` is not a number.
        ValueError: ``amount`` is negative, or a float above 1.

    Example:
        >>> import torch
        >>> from tether.prune import RandomStructured
        >>> method = RandomStructured(amount=2, dim=1)
        >>> mask = method.compute_mask(torch.randn(3, 4), torch.ones(3, 4))
        >>> (mask.sum(dim=0) == 0).sum().item()
        2
    """

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, dim: int = -1) -> None:
        check_amount(amount)
        self.amount = amount
        self.dim = dim

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        dim = channel_dim(t, self.dim)
        size = t.shape[dim]
        count = _count(self.amount, size, "channels")
        if count == 0:
            return default_mask
        # One draw per channel, on the CPU in the default dtype (Note [Masks equal to
        # PyTorch's]); the channels above the count-th smallest draw are kept.
        draws = torch.rand(size)
        kept = (draws > torch.kthvalue(draws, count).values).nonzero().flatten()
        return _channels(t, dim, kept) * default_mask.to(dtype=t.dtype)

    def __repr__(self) -> str:
        return f"RandomStructured(amount={self.amount!r}, dim={self.dim!r})"


class LnStructured(BasePruningMethod):
    """Prunes ``amount`` of the unpruned channels along ``dim``, those of smallest Ln norm.

    The method behind :func:`tether.prune.ln_structured`; the norm of a channel
    ``t.select(dim, i)`` is ``torch.norm(channel, p=n)``. Masks as
    ``torch.nn.utils.prune.LnStructured``, ties included.

    Args:
        amount: how many channels to prune (int) or the fraction of them (float in [0, 1]).
        n: the order of the norm, any ``p`` of :func:`torch.norm`.
        dim: the dimension indexing the channels.

    Raises:
        TypeError: ``amount`` is not a number, or ``n`` is not a norm order.
        ValueError: ``amount`` is negative, or a float above 1.

    Example:
        >>> import torch
        >>> from tether.prune import LnStructured
        >>> t = torch.tensor([[3.0, 4.0], [0.1, 0.2], [1.0, 1.0]])
        >>> LnStructured(amount=1, n=2, dim=0).compute_mask(t, torch.ones(3, 2))
        tensor([[1., 1.],
                [0., 0.],
                [1., 1.]])
    """

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
        dim = channel_dim(t, self.dim)
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

    def __repr__(self) -> str:
        return f"LnStructured(amount={self.amount!r}, n={self.n!r}, dim={self.dim!r})"


class CustomFromMask(BasePruningMethod):
    """Multiplies a given mask into the current one: prunes where ``mask`` is 0.

    The method behind :func:`tether.prune.custom_from_mask` and the last step of
    :func:`tether.prune.global_unstructured`, as ``torch.nn.utils.prune.CustomFromMask``.
    Its ``PRUNING_TYPE`` is ``"global"``: the mask is given for the whole tensor.

    Args:
        mask: a tensor of the pruned tensor's shape, 0 where pruned and 1 where kept.

    Raises:
        TypeError: ``mask`` is not a tensor.

    Example:
        >>> import torch
        >>> from tether.prune import CustomFromMask
        >>> method = CustomFromMask(torch.tensor([0, 1, 1]))
        >>> method.compute_mask(torch.randn(3), default_mask=torch.tensor([1.0, 1.0, 0.0]))
        tensor([0., 1., 0.])
    """

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

    def __repr__(self) -> str:
        return f"CustomFromMask(mask of shape {tuple(self.mask.shape)})"
