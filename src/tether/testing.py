"""Checks for users' own parametrizations: ``check_parametrization``."""

from __future__ import annotations

import math
from typing import NoReturn

import torch
from torch import Tensor, nn

from tether.constraints._base import Constraint, default_atol

__all__ = ["check_parametrization"]


def check_parametrization(
    parametrization: nn.Module, X: Tensor, *, atol: float | None = None
) -> None:
    """Check that a parametrization and its ``right_inverse`` fit together at ``X``.

    Checks, in order, and raises an ``AssertionError`` naming the first that fails and by how
    much:

    1. ``right_inverse(X)`` returns tensors, one of them with ``X``'s dtype if only one;
    2. ``forward(right_inverse(X))`` has the shape and dtype of ``X``;
    3. ``forward(right_inverse(X)) ≈ X`` within ``atol`` (default: the square root of the
       dtype's epsilon, scaled by the size of ``X``);
    4. gradients flow: backpropagating through ``forward`` gives finite gradients for every
       original;
    5. for tether's constraints, ``forward`` of an arbitrary tensor lies in the set.

    ``X`` must be a value the parametrization can produce (a member of the set).

    Args:
        parametrization: an ``nn.Module`` with ``forward`` and, optionally, ``right_inverse``.
        X: a value in the image of ``forward``.
        atol: the tolerance of checks 3 and 5.

    Example:
        >>> import torch
        >>> from tether.testing import check_parametrization
        >>> class Symmetric(torch.nn.Module):
        ...     def forward(self, X):
        ...         return X.triu() + X.triu(1).mT
        ...     def right_inverse(self, A):
        ...         return A.triu()
        >>> A = torch.randn(4, 4)
        >>> check_parametrization(Symmetric(), A + A.T)
        >>> check_parametrization(Symmetric(), torch.randn(4, 4))
        Traceback (most recent call last):
        ...
        AssertionError: Symmetric: forward(right_inverse(X)) differs from X by ...
    """
    name = type(parametrization).__name__
    tolerance = _tolerance(X) if atol is None else atol
    with torch.no_grad():
        inverse = getattr(parametrization, "right_inverse", None)
        originals = X if inverse is None else inverse(X)
    if isinstance(originals, Tensor):
        originals = (originals,)
        if originals[0].dtype != X.dtype:
            _fail(name, f"right_inverse changed the dtype from {X.dtype} to {originals[0].dtype}")
    elif not all(isinstance(t, Tensor) for t in originals):
        _fail(name, "right_inverse must return a tensor or a sequence of tensors")
    originals = tuple(
        t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in originals
    )

    value = parametrization(*originals)
    if not isinstance(value, Tensor):
        _fail(name, f"forward returned {type(value).__name__}, not a tensor")
    if value.shape != X.shape or value.dtype != X.dtype:
        _fail(
            name,
            f"forward(right_inverse(X)) has shape {tuple(value.shape)} and dtype {value.dtype}; "
            f"X has shape {tuple(X.shape)} and dtype {X.dtype}",
        )
    error = (value.detach() - X).abs().max().item() if X.numel() else 0.0
    if not error <= tolerance:
        _fail(
            name,
            f"forward(right_inverse(X)) differs from X by {error:.2e} "
            f"(max abs error; tolerance {tolerance:.2e})",
        )

    if not value.requires_grad:
        _fail(name, "no finite gradient reaches original 0 through forward (its output has none)")
    cotangent = torch.randn_like(value)
    (value * cotangent).real.sum().backward()  # type: ignore[no-untyped-call]  # untyped in torch
    for i, original in enumerate(originals):
        if original.requires_grad and (
            original.grad is None or not bool(torch.isfinite(original.grad).all())
        ):
            _fail(name, f"no finite gradient reaches original {i} through forward")

    if isinstance(parametrization, Constraint):
        with torch.no_grad():
            arbitrary = parametrization(*(torch.randn_like(t) for t in originals))
            distance = float(parametrization.distance(arbitrary))
        if not distance <= tolerance:
            _fail(
                name,
                f"forward of a random tensor is {distance:.2e} away from the set "
                f"(tolerance {tolerance:.2e})",
            )


def _tolerance(X: Tensor) -> float:
    """sqrt(eps) of the dtype, scaled by the square root of the largest dimension."""
    dtype = X.real.dtype if X.is_complex() else X.dtype
    size = max(X.shape[-2:], default=1)
    return default_atol(dtype) * math.sqrt(max(size, 1))


def _fail(name: str, message: str) -> NoReturn:
    raise AssertionError(f"{name}: {message}")
