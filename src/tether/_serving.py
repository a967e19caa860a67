"""Serving a given tensor in place of a parametrized one: ``functional_call`` and resets.

While a value is served, reading ``module.<name>`` returns it as it is, without running the
parametrizations; the originals and the parametrizations' state are not touched. Two users:

- ``torch.func.functional_call(module, {"weight": W}, x)`` uses ``W`` as given, as PyTorch's
  documentation promises for parametrized modules (Note [functional_call on a parametrized
  name]).
- ``reset_parameters()`` of a parametrized module serves a plain tensor to the base class's
  ``reset_parameters``, which initialises it in place (:mod:`tether._reset`).

Note [functional_call on a parametrized name]
    ``functional_call`` swaps each given tensor in with ``setattr(module, name, value)`` when
    ``name`` is neither a parameter nor a buffer, and swaps the previous value back the same
    way when the call ends. On a parametrized module both land in the property's setter,
    which for any other caller must assign through ``right_inverse``. The setter recognises
    ``functional_call`` by the frames above it: torch's ``NamedMemberAccessor
    .swap_tensors_dict`` called by ``torch.nn.utils.stateless._reparametrize_module``. Each
    served value remembers the ``_reparametrize_module`` frame that served it (one per
    ``functional_call``), the ``swap_tensors_dict`` frame (one to swap in, another to swap
    back) and the exception being handled then: a swap from the same call that comes from
    another ``swap_tensors_dict`` (the end of the call), or from the same one while a new
    exception is handled (torch undoing a failed swap-in), ends the serving instead of
    starting one. Served values form a stack per tensor, so nested calls restore in order.
    The getter is not involved: the chain serves the value in place of its ``forward``
    (``ParametrizationList.serve``), so reading a parametrized tensor costs the same.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import NamedTuple

from torch import Tensor

from tether import _torch_compat
from tether._parametrization_list import ParametrizationList

__all__ = ["serving", "swap_from_functional_call"]

# Private to torch (tether._torch_compat): if a version renames either, they are None and
# functional_call falls back to assigning through right_inverse, as torch's parametrize does.
_SWAP_DICT: CodeType | None = _torch_compat.swap_tensors_dict_code
_REPARAMETRIZE: CodeType | None = _torch_compat.reparametrize_module_code
# Frames between the setter and swap_tensors_dict: the property, Module.__setattr__, tether's
# __setattr__, a base class's own __setattr__ or two, swap_tensor, the accessor's swap_tensor.
_MAX_DEPTH = 12


class _Served(NamedTuple):
    value: Tensor | None
    call: FrameType | None  # the functional_call that served it; None for serving()
    swap: FrameType | None
    exception: BaseException | None


@contextlib.contextmanager
def serving(plist: ParametrizationList, value: Tensor) -> Iterator[None]:
    """Serve ``value`` for ``plist``'s tensor inside the block."""
    entry = _Served(value, None, None, None)
    plist.serve(value, entry)
    try:
        yield
    finally:
        plist.stop_serving(entry)


def _functional_call_frames() -> tuple[FrameType, FrameType] | None:
    """The ``_reparametrize_module`` and ``swap_tensors_dict`` frames above, if any."""
    if _SWAP_DICT is None or _REPARAMETRIZE is None:
        return None
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code is _SWAP_DICT:
            call = frame.f_back
            if call is not None and call.f_code is _REPARAMETRIZE:
                return call, frame
            return None
        frame = frame.f_back
    return None


def swap_from_functional_call(plist: ParametrizationList, value: Tensor | None) -> bool:
    """Serve or stop serving ``value`` if ``functional_call`` is assigning it; else ``False``.

    See Note [functional_call on a parametrized name].
    """
    frames = _functional_call_frames()
    if frames is None:
        return False
    call, swap = frames
    exception = sys.exc_info()[1]
    top = plist.served_token()
    if (
        isinstance(top, _Served)
        and top.call is call
        and (top.swap is not swap or top.exception is not exception)
    ):
        plist.stop_serving(top)
    else:
        entry = _Served(value, call, swap, exception)
        plist.serve(value, entry)
    return True
