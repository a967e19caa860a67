"""Writing into a module's tensors while keeping the objects that optimizers hold.

An optimizer, a DDP bucket or an FSDP shard refers to a ``Parameter`` object: registering,
assigning, loading and removing a parametrization change its data, never the object
(:func:`set_in_place`). What a parametrization's ``right_inverse`` writes into its own tensors
(a norm, a base point) can be undone when a later step fails (:func:`save_state`,
:func:`restore_state`), which makes those operations all or nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tether import _distributed
from tether._torch_compat import is_traceable_wrapper_subclass

__all__ = ["SavedState", "register", "restore_state", "save_state", "set_in_place"]

#: Each parameter and buffer of some modules: the dictionary holding it, its name, the
#: tensor and a copy of its values.
SavedState = list[tuple[dict[str, Any], str, Tensor, Tensor]]


def set_in_place(dest: Tensor, src: Tensor, *, copy: bool = False) -> None:
    """Give ``dest`` the data of ``src`` while keeping the ``dest`` object (optimizers hold it).

    With ``copy``, ``src`` is copied into ``dest``'s memory when it fits, as for an assignment
    to a tensor of fixed shape (Note [Assignment and reading threads]); otherwise ``dest`` is
    pointed at ``src``'s memory, as torch's parametrize does.
    """
    if _distributed.is_sharded(dest):  # Note [Sharded originals]
        _distributed.set_shard(dest, src)
    elif torch.__future__.get_swap_module_params_on_conversion() or is_traceable_wrapper_subclass(
        dest
    ):
        if isinstance(dest, nn.Parameter) and not isinstance(src, nn.Parameter):
            src = nn.Parameter(src, requires_grad=dest.requires_grad)
        torch.utils.swap_tensors(dest, src)  # type: ignore[no-untyped-call]  # untyped in torch
    elif copy and _can_copy(dest, src):
        dest.copy_(src)
    else:
        dest.set_(src)  # type: ignore[call-overload]  # torch's stubs miss set_(Tensor)


def _can_copy(dest: Tensor, src: Tensor) -> bool:
    """Whether ``src`` fits ``dest``'s memory and does not overlap it."""
    return (
        dest.shape == src.shape
        and dest.dtype == src.dtype
        and dest.device == src.device
        and not dest.is_meta
        and dest.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    )


def register(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Register ``tensor`` as a parameter if it is one, else as a buffer."""
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def save_state(module: nn.Module) -> SavedState:
    """The parameters and buffers of ``module`` and its submodules, for :func:`restore_state`.

    A ``right_inverse`` may write into its parametrization's tensors in place (a norm) or
    rebind them (a base point of another dtype): both are undone.
    """
    with torch.no_grad():
        return [
            (tensors, name, tensor, tensor.clone())
            for m in module.modules()
            for tensors in (m._parameters, m._buffers)
            for name, tensor in tensors.items()
            if tensor is not None
        ]


def restore_state(saved: SavedState) -> None:
    """Put back the tensors and values :func:`save_state` recorded."""
    with torch.no_grad():
        for tensors, name, tensor, copy in saved:
            tensors[name] = tensor
            if tensor.shape == copy.shape and tensor.dtype == copy.dtype:
                tensor.copy_(copy)
