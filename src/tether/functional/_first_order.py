"""A guard for gradients that are exact to first order only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["first_order"]


class _FirstOrder(torch.autograd.Function):
    """Passes a gradient on unchanged; differentiating it raises ``RuntimeError(message)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gradient: Tensor, message: str, *_: Tensor) -> Tensor:
        return gradient.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> tuple[None, ...]:
        raise RuntimeError(ctx.message)

    @staticmethod
    def jvp(ctx: Any, *_: Any) -> Tensor:
        raise RuntimeError(ctx.message)


def first_order(gradient: Tensor, message: str, *inputs: Tensor) -> Tensor:
    """``gradient``, marked as depending on ``inputs`` in a way that cannot be differentiated.

    A custom backward (or jvp) that computes its result without recording it gives autograd
    a constant: a second derivative through it would silently come out as zero. Returning
    ``first_order(result, message, *inputs)`` instead makes any attempt to differentiate the
    result raise ``RuntimeError(message)``.

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> g = first_order(torch.zeros(2), "no second derivative", x)
        >>> try:
        ...     g.sum().backward()
        ... except RuntimeError as error:
        ...     print(error)
        no second derivative
    """
    return _FirstOrder.apply(gradient, message, *inputs)  # type: ignore[no-untyped-call]  # untyped in torch
