"""Loading checkpoints of models pruned by ``torch.nn.utils.prune`` into tether-pruned ones.

``torch.nn.utils.prune`` saves a pruned ``weight`` as ``weight_orig`` (the unpruned values) and
``weight_mask``; tether saves the same two tensors as ``parametrizations.weight.original`` and
``parametrizations.weight.0.mask``. A load pre-hook on the pruned module renames the former to
the latter before the module loads.

Note [Why a hook on the pruned module]
    ``nn.Module.load_state_dict`` hands each module only the keys under its own prefix, after
    the parent has loaded. The keys ``weight_orig`` and ``weight_mask`` sit at the prefix of the
    module that owns ``weight``, not under its ``parametrizations`` child, so the renaming must
    happen in that module's pre-hook, before its children receive their keys. The hook is a
    module-level function (registered with the module passed in), so pruned models still pickle
    and deepcopy; one hook serves every pruned tensor of the module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tether._parametrization_list import plists_of
from tether._torch_compat import hook_function, load_state_dict_pre_hooks
from tether.prune._mask import find_mask

__all__ = ["drop_torch_keys_hook", "ensure_torch_keys_hook", "load_torch_keys"]


def load_torch_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Rename ``<name>_orig`` and ``<name>_mask`` to tether's keys for each pruned tensor.

    Only where the mask is the first parametrization of the tensor (as torch's pruning is the
    only one); other keys are left for ``load_state_dict`` to report.
    """
    for name in plists_of(module):
        orig_key, mask_key = f"{prefix}{name}_orig", f"{prefix}{name}_mask"
        if orig_key not in state_dict and mask_key not in state_dict:
            continue
        found = find_mask(module, name)
        if found is None or found[1] != 0:
            continue
        block = f"{prefix}parametrizations.{name}."
        for old, new in ((orig_key, f"{block}original"), (mask_key, f"{block}0.mask")):
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)


def _is_ours(hook: object) -> bool:
    return hook_function(hook) is load_torch_keys


def ensure_torch_keys_hook(module: nn.Module) -> None:
    """Register :func:`load_torch_keys` on ``module`` unless it is there already."""
    # torch keeps the hooks in a private dict and offers no lookup (tether._torch_compat).
    if not any(_is_ours(hook) for hook in load_state_dict_pre_hooks(module).values()):
        module.register_load_state_dict_pre_hook(load_torch_keys)  # type: ignore[no-untyped-call]  # untyped in torch


def drop_torch_keys_hook(module: nn.Module) -> None:
    """Remove :func:`load_torch_keys` from ``module`` (its last pruned tensor was removed)."""
    hooks = load_state_dict_pre_hooks(module)
    for key in [key for key, hook in hooks.items() if _is_ours(hook)]:
        del hooks[key]
