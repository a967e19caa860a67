"""``PruningMask``: the parametrization that multiplies a tensor by a fixed binary mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from tether._chains import originals
from tether._checks import describe
from tether._parametrization_list import ParametrizationList, plists_of

if TYPE_CHECKING:
    from tether.prune._base import BasePruningMethod

__all__ = ["PruningMask", "find_mask", "value_through"]


class PruningMask(nn.Module):
    """Multiplies a tensor by a fixed mask of zeros and ones: the parametrization of pruning.

    ``forward(X) = X * mask``: the entries where the mask is 0 are pruned. The functions of
    :mod:`tether.prune` register it on a tensor, so that ``module.weight`` reads the pruned
    tensor while ``module.parametrizations.weight.original`` keeps the unpruned values (torch's
    ``weight_orig``). The mask is a buffer, saved in the ``state_dict`` as
    ``parametrizations.<name>.<i>.mask`` with the tensor's dtype (torch's ``weight_mask``).

    Because the mask multiplies, the gradient of a pruned entry is zero: training never revives
    it. Pruning the tensor again updates this mask in place (see
    :func:`tether.prune.l1_unstructured`). Being a parametrization, it composes: prune an
    orthogonal weight (the mask comes after the orthogonal map), or register another
    parametrization after pruning.

    ``right_inverse`` is the identity: assigning ``module.weight = X`` stores ``X`` as the
    original, and ``module.weight`` then reads ``X * mask``, the nearest tensor that is zero
    where pruned.

    The pruning functions also keep, as the attribute ``method``, the pruning method that
    computed the mask (torch keeps it as the module's forward pre-hook): after repeated pruning
    a :class:`~tether.prune.PruningContainer` holding every method in order, and ``None`` for a
    mask built by hand. It is not part of the ``state_dict``.

    Args:
        mask: the mask, of the shape of the tensor it will be registered on: 1 to keep an
            entry, 0 to prune it.

    Raises:
        TypeError: ``mask`` is not a tensor.

    Example:
        >>> import torch, tether
        >>> from tether.prune import PruningMask
        >>> layer = torch.nn.Linear(2, 2)
        >>> mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> layer = tether.register_parametrization(layer, "weight", PruningMask(mask))
        >>> bool(layer.weight[0, 1] == 0), bool(layer.weight[0, 0] == 0)
        (True, False)
        >>> layer.parametrizations.weight[0]
        PruningMask(pruned=1/4)
    """

    mask: Tensor
    method: BasePruningMethod | None = None

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"PruningMask needs the mask as a tensor of zeros and ones; got {describe(mask)}."
            )
        self.register_buffer("mask", mask)

    def forward(self, X: Tensor) -> Tensor:
        return X * self.mask.to(dtype=X.dtype)

    def right_inverse(self, X: Tensor) -> Tensor:
        return X

    def extra_repr(self) -> str:
        if self.mask.is_meta:
            return f"shape={tuple(self.mask.shape)}"
        return f"pruned={int((self.mask == 0).sum())}/{self.mask.numel()}"


def find_mask(module: nn.Module, name: str) -> tuple[ParametrizationList, int, PruningMask] | None:
    """The parametrizations of ``module.<name>``, and the index and module of its (last) mask."""
    plist = plists_of(module).get(name)
    if plist is None:
        return None
    found = [(i, p) for i, p in enumerate(plist) if isinstance(p, PruningMask)]
    return (plist, *found[-1]) if found else None


def value_through(plist: ParametrizationList, index: int) -> Tensor:
    """The tensor as it leaves parametrization ``index`` of the chain ``plist``.

    Works on tether's and on torch's ``ParametrizationList`` (same attributes).
    """
    value: Tensor = plist[0](*originals(plist))
    for i in range(1, index + 1):
        value = plist[i](value)
    return value
