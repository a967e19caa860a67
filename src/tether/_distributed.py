"""Parametrized tensors of modules sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Note [Sharded originals]
    ``fully_shard`` replaces every parameter of a module, the originals of its
    parametrizations included, by a ``DTensor`` parameter holding this process's shard. Before
    the module's forward (and backward) it gathers the full parameters and registers them as
    plain tensors, so inside forward a parametrization computes on whole tensors as usual.
    Outside forward the originals are ``DTensor`` shards, and a parametrization that combines
    them with a plain tensor (the base point of ``orthogonal``, spectral norm's vectors, a
    pruning mask) fails with PyTorch's "got mixed torch.Tensor and DTensor" error; one that
    couples all entries of a weight cannot run on a shard at all.

    So a read outside forward gathers the originals (``DTensor.full_tensor()``) and evaluates
    the parametrization on the full values: the result is the full, plain tensor, the same in
    every process. Gathering is a collective: every process must read the tensor, in the same
    order, as with any ``full_tensor()``. Gradients flow back to each process's shard,
    averaged over the processes as FSDP averages the gradients of the forward pass. Assigning
    the tensor does the converse: every process runs the right inverse on the full value and
    keeps its own shard of the result.

    ``ParametrizationList.forward`` takes this path only when an original is not exactly an
    ``nn.Parameter`` (a one-comparison check on the getter's hot path); plain tensors that are
    not ``DTensor`` pass through unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["full", "full_originals", "is_sharded", "set_shard"]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 shards parameters into them)."""
    # No DTensor exists before its module is imported; not importing it here keeps this check
    # free of side effects (it runs while torch.compile traces, e.g. under functional_call).
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def full(tensor: Tensor) -> Tensor:
    """The whole value of a sharded original, differentiably; other tensors unchanged."""
    if not is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import Partial

    sharded: Any = tensor
    # The gradient of the full value comes back averaged over the processes and split into
    # shards (a reduce-scatter), as FSDP does with the gradients of the forward pass.
    average = [Partial("avg")] * len(sharded.placements)
    value: Tensor = sharded.full_tensor(grad_placements=average)
    return value


def full_originals(originals: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """:func:`full` of each original."""
    return tuple(full(original) for original in originals)


def set_shard(dest: Tensor, value: Tensor) -> None:
    """Write this process's shard of the full ``value`` into the sharded ``dest``, in place."""
    from torch.distributed.tensor import distribute_tensor

    sharded: Any = dest
    # src_data_rank=None: every process holds the same full value, so each keeps its own
    # shard without communicating.
    shard = distribute_tensor(
        value.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None
    )
    dest.copy_(shard)
