"""The backward shared by the fast paths of the skew exponential: first order, with exact
second derivatives through :func:`torch.linalg.matrix_exp` when autograd records it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether.functional._first_order import first_order

__all__ = ["skew_exp_backward"]


def _recorded(X: Tensor, grad: Tensor) -> Tensor | None:
    """``X̄`` through :func:`torch.linalg.matrix_exp` of the skew part, recorded by autograd;
    None where nothing can be recorded (some nested :mod:`torch.func` transforms)."""
    with torch.enable_grad():
        Q = torch.linalg.matrix_exp((X - X.mH) / 2)
    if not Q.requires_grad:
        return None
    (X_bar,) = torch.autograd.grad(Q, X, grad, create_graph=True, allow_unused=True)
    return X_bar


def skew_exp_backward(
    X: Tensor, grad: Tensor, gradient: Callable[[], Tensor], no_second_derivative: str
) -> Tensor:
    """``X̄`` for ``Q = exp((X - Xᴴ) / 2)`` and its cotangent ``grad``, from ``gradient()``.

    ``gradient`` computes the first-order gradient without autograd; see Note [Derivatives of
    skew_matrix_exp] in ``_skew_exp.py``. When autograd records the backward
    (``create_graph=True``) the gradient is recomputed through
    :func:`torch.linalg.matrix_exp` instead, which can be differentiated again. Under
    :mod:`torch.func` transforms that record nothing, the result is guarded by
    :func:`first_order`: differentiating it raises ``RuntimeError(no_second_derivative)``
    rather than coming out as zero.

    Example:
        >>> import torch
        >>> X = torch.zeros(2, 2, dtype=torch.float64)
        >>> G = torch.ones(2, 2, dtype=torch.float64)
        >>> skew_exp_backward(X, G, lambda: torch.zeros_like(X), "first order only")
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    if torch.is_grad_enabled():
        X_bar = _recorded(X, grad)
        if X_bar is not None:
            return X_bar
    with torch.no_grad():
        X_bar = gradient()
    if torch.is_grad_enabled():
        return first_order(X_bar, no_second_derivative, X, grad)
    return X_bar
