"""Validation helpers and the wording of tether's error messages.

Every message says who (the module's class and the tensor), what was found, what was expected
and how to fix it, with expected and found values on separate lines. Keeping the builders here
keeps the wording uniform across the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "bad_shape",
    "describe",
    "expect_same_dtype",
    "expect_same_shape",
    "expect_tensor",
    "expect_tensors",
    "where",
]


def where(module: nn.Module, tensor_name: str) -> str:
    """Name a tensor of a module for a message, e.g. ``"Linear.weight"``."""
    cls = type(module)
    if getattr(cls, "_tether_shared", False) or _is_torch_parametrized(module):
        cls = cls.__bases__[0]
    return f"{cls.__name__}.{tensor_name}"


def _is_torch_parametrized(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("_modules", {}).get("parametrizations"), nn.ModuleDict)


def describe(value: object) -> str:
    """Describe a value without printing its contents (tensors can be large)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if value is None:
        return "None"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"a {type(value).__name__} of {len(value)} items"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def expect_tensor(value: object, what: str, fix: str) -> Tensor:
    """Return ``value`` if it is a tensor, else raise a ``TypeError`` naming ``what``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a tensor; got {describe(value)}. {fix}")
    return value


def expect_tensors(value: object, what: str) -> Tensor | tuple[Tensor, ...]:
    """Accept a tensor or a sequence of tensors (what ``right_inverse`` may return)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        for i, item in enumerate(value):
            if not isinstance(item, Tensor):
                raise ValueError(
                    f"{what} must return a Tensor or a Sequence of tensors; "
                    f"item {i} of the sequence is {describe(item)}."
                )
        return tuple(value)
    raise ValueError(
        f"{what} must return a Tensor or a Sequence of tensors (list, tuple...); "
        f"got {describe(value)}."
    )


def expect_same_dtype(expected: torch.dtype, got: torch.dtype, what: str, fix: str) -> None:
    """Raise a ``ValueError`` when two dtypes differ."""
    if expected != got:
        raise ValueError(f"{what}\n  expected dtype: {expected}\n  got dtype:      {got}\n{fix}")


def expect_same_shape(expected: torch.Size, got: torch.Size, what: str, fix: str) -> None:
    """Raise a ``ValueError`` when two shapes differ."""
    if expected != got:
        raise ValueError(
            f"{what}\n  expected shape: {tuple(expected)}\n  got shape:      {tuple(got)}\n{fix}"
        )


def bad_shape(
    constraint: str, label: str, shape: Sequence[int], needs: str, hint: str = ""
) -> ValueError:
    """The error for a shape a constraint's math rules out.

    Example: ``orthogonal() on Linear.weight needs a matrix or a batch of matrices; got shape
    (20,). For vectors use tether.sphere.``
    """
    message = f"{constraint} on {label} needs {needs}; got shape {tuple(shape)}."
    return ValueError(f"{message} {hint}" if hint else message)
