"""Low-precision tensors: compute in float32 (complex64), store in the tensor's own dtype."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from tether._torch_compat import any_autocast_enabled

__all__ = [
    "autocast_enabled",
    "compute_dtype",
    "precision_eps",
    "real_dtype",
    "storage_dtype",
    "stored_as",
    "to_storage",
    "upcast",
]

# Note [Low-precision tensors]
#     float16 and bfloat16 keep 11 and 8 significant bits. The linear algebra behind the
#     constraints (QR, eigh, svd, solve, matrix_exp, det, geqrf) has no CPU kernels for them,
#     and where kernels exist (CUDA) they lose what few digits there are: an orthogonal
#     matrix computed in bfloat16 is off the set by about its own rounding error times n.
#     tether does what torch.autocast does for these ops: a constraint computes in float32
#     (complex64 for complex32) and rounds the result back to the tensor's dtype. The casts
#     are differentiable, so the original keeps its dtype, gets gradients of that dtype, and
#     the optimizer trains it as it is. State a constraint keeps (an orthogonal base point)
#     is stored in the tensor's dtype too, as module.to() leaves it, and is cast to the
#     compute dtype where it is used. Tolerances come from the dtype the values are stored
#     in (rounding to bfloat16 already moves a member by about its eps), not from float32's:
#     inside such a computation precision_eps gives the stored dtype's eps, so that a floor
#     or a tolerance computed in float32 still means something once rounded to bfloat16.
#     Constraints also compute with autocast disabled: autocast would run their matrix
#     products in the low dtype, and a constrained weight is a parameter, which autocast
#     casts where it is used.

_COMPUTE: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.complex32: torch.complex64,
    **{
        dtype: torch.float32
        for dtype in vars(torch).values()
        if isinstance(dtype, torch.dtype) and str(dtype).startswith("torch.float8")
    },
}


_REAL: dict[torch.dtype, torch.dtype] = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}

# The dtype of the tensor a constraint is computing on in a higher precision, if it is.
_STORED: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "tether_stored_dtype", default=None
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype tether computes in for tensors of ``dtype``: see Note [Low-precision tensors].

    ``float32`` for ``float16``, ``bfloat16`` and the ``float8`` types, ``complex64`` for
    ``complex32``, ``dtype`` itself otherwise.

    Example:
        >>> import torch
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return _COMPUTE.get(dtype, dtype)


def upcast(X: Tensor) -> Tensor:
    """``X`` in its compute dtype (:func:`compute_dtype`): ``X`` itself if that is its dtype.

    Example:
        >>> import torch
        >>> upcast(torch.ones(2, dtype=torch.float16)).dtype
        torch.float32
    """
    dtype = _COMPUTE.get(X.dtype)
    return X if dtype is None else X.to(dtype)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real counterpart of a complex ``dtype`` (``float32`` for ``complex64``), or ``dtype``.

    ``dtype.to_real()``, which ``torch.compile`` cannot trace.

    Example:
        >>> import torch
        >>> real_dtype(torch.complex32), real_dtype(torch.bfloat16)
        (torch.float16, torch.bfloat16)
    """
    return _REAL.get(dtype, dtype)


def storage_dtype(computed: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """The dtype to store a result computed as ``computed`` for a tensor stored as ``stored``.

    ``stored`` for a complex result (or a real one from a real tensor), its real counterpart
    for a real result from a complex tensor (singular values of a complex32 matrix are
    float16). Results that are neither floating point nor complex keep their dtype.

    Example:
        >>> import torch
        >>> storage_dtype(torch.float32, torch.complex32)
        torch.float16
    """
    if computed.is_complex:
        return stored
    if computed.is_floating_point:
        return real_dtype(stored)
    return computed


def to_storage(value: object, stored: torch.dtype) -> object:
    """Cast the tensors of ``value`` (a tensor, or a tuple or list of them) for storage.

    Each goes to :func:`storage_dtype` of its dtype and ``stored``; anything else is returned
    as it is.

    Example:
        >>> import torch
        >>> [t.dtype for t in to_storage((torch.ones(1), torch.ones(1)), torch.bfloat16)]
        [torch.bfloat16, torch.bfloat16]
    """
    if isinstance(value, Tensor):
        return value.to(storage_dtype(value.dtype, stored))
    if isinstance(value, (tuple, list)):
        return type(value)(to_storage(item, stored) for item in value)
    return value


def autocast_enabled(device: Tensor | str) -> bool:
    """Whether autocast is enabled on the device type of ``device`` (a tensor, or the type).

    ``False`` for device types without autocast (``"meta"``).

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_enabled(torch.ones(1)), autocast_enabled("meta")
        (True, False)
    """
    # One call for all device types (private to torch, see tether._torch_compat), about ten
    # times cheaper than the per-device query, answers the usual case (autocast off) before
    # the tensor's device is even looked up.
    if not any_autocast_enabled():
        return False
    device_type = device if isinstance(device, str) else device.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@contextlib.contextmanager
def stored_as(dtype: torch.dtype) -> Iterator[None]:
    """Mark the computation inside the block as one on values stored as ``dtype``.

    :func:`precision_eps` then answers for ``dtype``. The mark is per thread (and per task).

    Example:
        >>> import torch
        >>> with stored_as(torch.bfloat16):
        ...     precision_eps(torch.ones(1))
        0.0078125
    """
    token = _STORED.set(dtype)
    try:
        yield
    finally:
        _STORED.reset(token)


def precision_eps(X: Tensor) -> float:
    """The machine epsilon of the precision that the values of ``X`` carry.

    That of ``X.dtype``, or the larger one of the dtype in :func:`stored_as`: a float32
    tensor computed from bfloat16 values is only as accurate as bfloat16 (Note
    [Low-precision tensors]).

    Example:
        >>> import torch
        >>> precision_eps(torch.ones(1, dtype=torch.float64))
        2.220446049250313e-16
    """
    eps = torch.finfo(X.dtype).eps
    stored = _STORED.get()
    return eps if stored is None else max(eps, torch.finfo(stored).eps)
