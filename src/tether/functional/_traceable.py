"""Autograd Functions that ``torch.compile`` can trace: the same Function without forward mode."""

from __future__ import annotations

import torch

__all__ = ["traceable"]


def traceable(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """A twin of ``function`` with its ``forward``, ``setup_context`` and ``backward`` only.

    Dynamo cannot trace an autograd.Function that defines ``jvp`` (torch 2.13: "Unsupported
    custom jvp"): calling one breaks the graph of a compiled model in two. Under
    :func:`torch.compile` a map applies this twin instead, which computes the same values and
    gradients; what it lacks (forward-mode AD, a custom vmap rule) is what a compiled
    training step does not use.

    Example:
        >>> class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(x):
        ...         return 2 * x
        ...     @staticmethod
        ...     def setup_context(ctx, inputs, output):
        ...         pass
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         return 2 * grad
        ...     @staticmethod
        ...     def jvp(ctx, x_dot):
        ...         return 2 * x_dot
        >>> twin = traceable(Double)
        >>> hasattr(twin, "jvp") and twin.jvp is Double.jvp
        False
        >>> twin.apply(torch.ones(2))
        tensor([2., 2.])
    """
    members: dict[str, object] = {
        name: staticmethod(getattr(function, name))
        for name in ("forward", "setup_context", "backward")
    }
    members["__doc__"] = function.__doc__
    return type(f"{function.__name__}Traceable", (torch.autograd.Function,), members)
