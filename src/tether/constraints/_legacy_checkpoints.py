"""Loading checkpoints of torch's hook-based ``weight_norm`` and ``spectral_norm``."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from torch import nn

from tether import _torch_compat
from tether.parametrize import chains

if TYPE_CHECKING:
    from tether.constraints._spectral_norm import SpectralNorm
    from tether.constraints._weight_norm import WeightNorm

__all__ = ["add_load_hook", "first_parametrization", "load_spectral_norm", "load_weight_norm"]

# Note [Loading the checkpoints of torch's hook-based norms]
#     torch.nn.utils.weight_norm and torch.nn.utils.spectral_norm, the hook-based versions
#     that predate parametrizations, store ``weight_g``, ``weight_v`` and ``weight_orig``,
#     ``weight_u``, ``weight_v``. Module.load_state_dict hands a child only the keys under
#     its own prefix, so the parametrization cannot see these keys; the registering function
#     therefore adds a load_state_dict pre-hook on the module that renames them to the
#     parametrization's keys before the children load. The hook is a functools.partial of a
#     module-level function below, given the constraint's class and the tensor's name, so
#     parametrized models still pickle and deepcopy; it does nothing unless the first
#     parametrization of that tensor is of that class (once the parametrization is removed,
#     say). The earliest spectral_norm format (before its version 1: a ``weight`` buffer and
#     no ``weight_v``) is not converted; such keys are reported as unexpected.


def first_parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The first parametrization on ``module.<name>``, or ``None`` if it is not parametrized."""
    chain = chains(module).get(name)
    return None if chain is None or len(chain) == 0 else chain[0]


def add_load_hook(module: nn.Module, hook: functools.partial[None]) -> None:
    """Register a load_state_dict pre-hook on ``module`` unless an equal one is there.

    Partials compare by identity, so equal means the same function with the same arguments.
    """
    for entry in _torch_compat.load_state_dict_pre_hooks(module).values():
        other = _torch_compat.hook_function(entry)
        if (
            isinstance(other, functools.partial)
            and other.func is hook.func
            and other.args == hook.args
        ):
            return
    module.register_load_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]  # untyped in torch


def load_weight_norm(
    cls: type[WeightNorm],
    name: str,
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Rename ``<name>_g``, ``<name>_v`` to ``original0``, ``original1`` of a ``cls`` chain."""
    if not isinstance(first_parametrization(module, name), cls):
        return
    g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
    if g_key in state_dict and v_key in state_dict:
        block = f"{prefix}parametrizations.{name}."
        state_dict[block + "original0"] = state_dict.pop(g_key)
        state_dict[block + "original1"] = state_dict.pop(v_key)


def load_spectral_norm(
    cls: type[SpectralNorm],
    name: str,
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Rename ``<name>_orig`` to ``original`` of a ``cls`` chain, and set its vectors.

    The vectors ``<name>_u``, ``<name>_v`` become what the constraint makes of them
    (:meth:`SpectralNorm.state_from_hook_based`).
    """
    constraint = first_parametrization(module, name)
    if not isinstance(constraint, cls):
        return
    keys = [f"{prefix}{name}_{suffix}" for suffix in ("orig", "u", "v")]
    if not all(key in state_dict for key in keys):
        return
    original, u, v = (state_dict.pop(key) for key in keys)
    block = f"{prefix}parametrizations.{name}."
    state_dict[block + "original"] = original
    for key, value in constraint.state_from_hook_based(original, u, v).items():
        state_dict[f"{block}0.{key}"] = value
