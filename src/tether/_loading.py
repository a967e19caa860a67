"""Loading a ``state_dict`` into a parametrized module: plain checkpoints, all or nothing.

A parametrized module loads two layouts: tether's (torch's), with the originals under
``parametrizations.<name>.original``, and a plain one, with the value under ``<name>``, which
goes in through ``right_inverse``. Either way every entry for the module is checked before
anything is written: shapes, finite originals, a right inverse that accepts the value. If one
is wrong, each problem is reported and the module keeps all its tensors (the same objects,
the same values), where ``nn.Module`` would have loaded part of the checkpoint. Other modules
of the model load as PyTorch loads them.

State that a parametrization derives from its input must fit the loaded tensors, not the
ones it replaces (spectral norm's power-iteration vectors: Note [Power-iteration state after
a load or an assignment] in ``tether.constraints._spectral_norm``). A plain entry gets it
from ``right_inverse``. A checkpoint in tether's layout that holds the originals but not that
state (saved without it, or cut down for ``strict=False``) gets it from the first
parametrization's ``state_for(*originals)``, when it defines one: a dict from the names of
its missing buffers to their values for the loaded originals, which then load as if saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tether._chains import chains_of, original_names
from tether._checks import describe, expect_finite, expect_same_shape, tensor_label
from tether._parametrization_list import ParametrizationList, Plan

__all__ = ["prepare"]

_FIX_SHAPE = "The checkpoint was saved from a model of another size; build this one alike."
_FIX_FINITE = "Load a checkpoint with finite values (NaN usually means training diverged)."


def prepare(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, assign: bool, errors: list[str]
) -> None:
    """Check ``module``'s entries of ``state_dict`` and rewrite them for its base class to load.

    On success, plain entries have gone in through ``right_inverse`` and are replaced by the
    originals and parametrization state they gave, which then load onto themselves. On
    failure, the problems are added to ``errors`` (``load_state_dict`` raises them) and the
    module's entries are replaced by its current tensors, so that loading changes nothing.
    """
    plists = chains_of(module)
    problems: list[str] = []
    planned: list[tuple[ParametrizationList, Plan]] = []
    plain: list[str] = []
    for name, plist in plists.items():
        key = prefix + name
        block = f"{prefix}parametrizations.{name}."
        if key in state_dict and not any(k.startswith(block) for k in state_dict):
            plain.append(name)
            try:
                planned.append((plist, _plan(plist, state_dict.pop(key), assign)))
            except (TypeError, ValueError, RuntimeError) as error:
                problems.append(f"While loading {key!r} through right_inverse: {error}")
        else:
            problems += _originals_problems(plist, state_dict, block)
    problems += _own_problems(module, state_dict, prefix)

    if problems:
        for plist, plan in planned:
            plist.rollback(plan)  # what the right inverses wrote into their parametrizations
        errors += problems
        _keep_current(module, state_dict, prefix, plain)
        return
    for plist, plan in planned:
        plist.commit(plan)
    for name in plain:
        block = f"{prefix}parametrizations.{name}."
        for child_key, tensor in plists[name].state_dict().items():
            state_dict[block + child_key] = tensor
    for name, plist in plists.items():
        if name not in plain:
            _derive_missing_state(plist, state_dict, f"{prefix}parametrizations.{name}.")


def _plan(plist: ParametrizationList, value: Any, assign: bool) -> Plan:
    if isinstance(value, Tensor):
        first = plist.originals()[0]
        if assign and first.is_meta:
            # load_state_dict(assign=True) into a model built on the meta device: give the
            # originals and the parametrizations' state real storage first.
            plist.to_empty(device=value.device)
            first = plist.originals()[0]
        value = value.to(device=first.device)
        if plist.is_tensor and value.is_floating_point() and first.is_floating_point():
            value = value.to(dtype=first.dtype)
    plan = plist.plan(value)
    # Loading never resizes a tensor, not even under unsafe=True (assignment may).
    try:
        for original, result in zip(plist.originals(), plan.originals, strict=True):
            what = f"{plist.label} would get originals of another shape."
            expect_same_shape(original.shape, result.shape, what, _FIX_SHAPE)
    except ValueError:
        plist.rollback(plan)
        raise
    return plan


def _derive_missing_state(
    plist: ParametrizationList, state_dict: dict[str, Any], block: str
) -> None:
    """Add the first parametrization's state for the checkpoint's originals where it lacks it."""
    state_for = getattr(plist[0], "state_for", None)
    if not callable(state_for):
        return
    first = block + "0."
    missing = [key for key in plist[0].state_dict() if first + key not in state_dict]
    names = original_names(plist)
    if not missing or any(block + n not in state_dict for n in names):
        return
    # On the device the originals will have: a meta original is replaced (assign=True).
    inputs = [
        state_dict[block + n].to(
            device=state_dict[block + n].device if current.is_meta else current.device,
            dtype=current.dtype,
        )
        for n, current in zip(names, plist.originals(), strict=True)
    ]
    with torch.no_grad():
        state = state_for(*inputs)
    for key in missing:
        if key in state:
            state_dict[first + key] = state[key]


def _originals_problems(
    plist: ParametrizationList, state_dict: dict[str, Any], block: str
) -> list[str]:
    problems = []
    for name, original in zip(original_names(plist), plist.originals(), strict=True):
        key = block + name
        if key in state_dict:
            what = f"Cannot load {plist.label} from {key!r}"
            problem = _shape_problem(original, state_dict[key], what)
            if problem is None:
                try:
                    expect_finite(state_dict[key], what, _FIX_FINITE)
                except ValueError as error:
                    problem = str(error)
            if problem is not None:
                problems.append(problem)
    return problems


def _own_problems(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> list[str]:
    problems = []
    for name, tensor in _own_tensors(module):
        key = prefix + name
        if key in state_dict:
            what = f"Cannot load {tensor_label(module, name)} from {key!r}"
            problem = _shape_problem(tensor, state_dict[key], what)
            if problem is not None:
                problems.append(problem)
    return problems


def _shape_problem(tensor: Tensor, value: object, what: str) -> str | None:
    """What is wrong with loading ``value`` into ``tensor``, by ``nn.Module``'s rules."""
    if not isinstance(value, Tensor):
        return f"{what}: the checkpoint holds {describe(value)}, not a tensor."
    if torch.nn.parameter.is_lazy(tensor) or (tensor.ndim == 0 and value.ndim == 1):
        return None  # a lazy module takes any shape; the 1-d case is a legacy scalar format
    try:
        expect_same_shape(tensor.shape, value.shape, f"{what}: it has another shape.", _FIX_SHAPE)
    except ValueError as error:
        return str(error)
    return None


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The module's own parameters and persistent buffers, as ``state_dict`` saves them."""
    skip = module._non_persistent_buffers_set
    return [
        *((n, t) for n, t in module._parameters.items() if t is not None),
        *((n, t) for n, t in module._buffers.items() if t is not None and n not in skip),
    ]


def _keep_current(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, plain: list[str]
) -> None:
    """Replace the module's entries by its own tensors, which load onto themselves."""
    for name, tensor in _own_tensors(module):
        if prefix + name in state_dict:
            state_dict[prefix + name] = tensor
    for name, plist in chains_of(module).items():
        block = f"{prefix}parametrizations.{name}."
        for child_key, tensor in plist.state_dict(keep_vars=True).items():
            if name in plain or block + child_key in state_dict:
                state_dict[block + child_key] = tensor
