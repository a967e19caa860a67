"""Loading checkpoints of torch's hook-based ``weight_norm`` and ``spectral_norm``."""

from __future__ import annotations

import functools

from torch import nn

from tether._parametrization_list import plists_of

__all__ = ["add_load_hook", "first_parametrization"]

# Note [Loading the checkpoints of torch's hook-based norms]
#     torch.nn.utils.weight_norm and torch.nn.utils.spectral_norm, the hook-based versions
#     that predate parametrizations, store ``weight_g``, ``weight_v`` and ``weight_orig``,
#     ``weight_u``, ``weight_v``. Module.load_state_dict hands a child only the keys under
#     its own prefix, so the parametrization cannot see these keys; the registering function
#     therefore adds a load_state_dict pre-hook on the module that renames them to the
#     parametrization's keys before the children load. The hook is a functools.partial of a
#     module-level function, so parametrized models still pickle and deepcopy, and it does
#     nothing once the parametrization is removed. The earliest spectral_norm format (before
#     its version 1: a ``weight`` buffer and no ``weight_v``) is not converted; such keys are
#     reported as unexpected.


def first_parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The first parametrization on ``module.<name>``, or ``None`` if it is not parametrized."""
    plist = plists_of(module).get(name)
    return None if plist is None or len(plist) == 0 else plist[0]


def add_load_hook(module: nn.Module, hook: functools.partial[None]) -> None:
    """Register a load_state_dict pre-hook on ``module`` unless an equal one is there."""
    # torch keeps the hooks in a private dict and offers no lookup; it wraps each in an object
    # whose ``hook`` attribute is the callable registered. Partials compare by identity, so
    # equal means the same function with the same arguments.
    for existing in module._load_state_dict_pre_hooks.values():
        other = getattr(existing, "hook", None)
        if (
            isinstance(other, functools.partial)
            and other.func is hook.func
            and other.args == hook.args
        ):
            return
    module.register_load_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]  # untyped in torch
