"""``reset_parameters()`` of a parametrized module: the base class's initialisation, kept.

The base class's ``reset_parameters`` writes in place into ``self.weight``
(``init.kaiming_uniform_(self.weight)``). On a parametrized module that tensor is computed, so
writing into it would change nothing (what happens with ``torch.nn.utils.parametrize``).
Here the base class initialises a plain tensor served in its place (:mod:`tether._serving`),
and the result is then assigned through the chain's ``right_inverse``, as
``module.weight = value`` would: the constraint gets the base class's initialisation, projected
onto its set where it is not a member (``tether.orthogonal`` takes the ``Q`` of its QR
decomposition). Parametrizations with state that depends on their input then re-initialise
it through ``reset_state(*inputs)`` (spectral norm redraws its power-iteration vectors). This
makes a model built on the meta device usable after ``to_empty``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from tether._chains import class_before
from tether._checks import tensor_label
from tether._parametrization_list import ParametrizationList, plists_of
from tether._serving import serving

__all__ = ["reset_parameters"]


def reset_parameters(self: nn.Module) -> None:
    """Re-initialise as the base class does, through each parametrization's ``right_inverse``.

    Tensors, and entries of a tensor, that the base class's ``reset_parameters`` leaves alone
    keep their values.
    """
    plists = plists_of(self)
    base: Any = class_before(self)
    stand_ins = {name: _stand_in(plist) for name, plist in plists.items()}
    versions = {name: stand_in._version for name, stand_in in stand_ins.items()}
    saved = _snapshot(self)
    try:
        with contextlib.ExitStack() as stack:
            for name, plist in plists.items():
                stack.enter_context(serving(plist, stand_ins[name]))
            base.reset_parameters(self)
        for name, plist in plists.items():
            if not _written(stand_ins[name], versions[name]):
                continue
            try:
                _keep_unwritten(plist, stand_ins[name])
                plist.right_inverse(stand_ins[name])
                reset_state(plist)
            except (ValueError, RuntimeError) as error:
                raise type(error)(
                    f"reset_parameters() of {tensor_label(self, name)}: the initialisation of "
                    f"{base.__name__} could not be set through its parametrizations, so the "
                    f"module was left as it was: {error}\nAssign a value they accept instead "
                    f"(module.{name} = value)."
                ) from error
    except BaseException:
        _put_back(self, saved)
        for plist in plists.values():
            plist.changed()
        raise


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the module's tensors (its parametrizations' originals and state included)."""
    with torch.no_grad():
        return {
            key: t.clone()
            for key, t in module.state_dict(keep_vars=True).items()
            if isinstance(t, Tensor)
        }


def _put_back(module: nn.Module, saved: dict[str, Tensor]) -> None:
    # By key: a parametrization may have replaced a buffer (spectral norm's vectors).
    current = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, copy in saved.items():
            current[key].copy_(copy)


def _stand_in(plist: ParametrizationList) -> Tensor:
    """An empty tensor of the parametrized tensor's shape and dtype, filled with NaN if float."""
    if plist.unsafe:
        with torch.no_grad():
            like = plist()
        stand_in = torch.empty_like(like)
    else:
        first = plist.originals()[0]
        stand_in = torch.empty(plist.parametrized_shape(), dtype=first.dtype, device=first.device)
    if stand_in.is_floating_point() or stand_in.is_complex():
        stand_in.fill_(float("nan"))
    else:
        stand_in.zero_()
    return stand_in


def _written(stand_in: Tensor, version: int) -> bool:
    """Whether the base class wrote into ``stand_in`` (``.data`` writes keep the version)."""
    if stand_in._version != version:
        return True
    if stand_in.is_meta:  # no values to look at
        return False
    if stand_in.is_floating_point() or stand_in.is_complex():
        return not bool(stand_in.isnan().all())
    return False


@torch.no_grad()
def _keep_unwritten(plist: ParametrizationList, stand_in: Tensor) -> None:
    """Give the entries the base class left alone (still NaN) their current values, as they
    keep them on a plain module; the current value is computed only if there are such."""
    if stand_in.is_meta or not (stand_in.is_floating_point() or stand_in.is_complex()):
        return
    holes = stand_in.isnan()
    if bool(holes.any()):
        stand_in[holes] = plist()[holes]


@torch.no_grad()
def reset_state(plist: ParametrizationList) -> None:
    """Let each parametrization with ``reset_state`` re-initialise it for its current input."""
    inputs = plist.originals()
    last = len(plist) - 1
    for i, parametrization in enumerate(plist):
        reset = getattr(parametrization, "reset_state", None)
        if callable(reset):
            reset(*inputs)
        if i < last:
            inputs = (parametrization(*inputs),)
