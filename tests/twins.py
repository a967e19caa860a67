"""What the torch-twin tests share: one scenario run through ``torch.nn.utils.parametrize``
and through ``tether.parametrize`` from the same seed, and comparisons of what a user sees.

``tether.parametrize`` claims to be a drop-in replacement for PyTorch's module. A twin test runs
one scenario through both implementations and checks that a user sees the same thing:
parametrized values, gradients on the originals, ``state_dict`` keys (in order) and tensors,
the class of the module, and the identity of the ``Parameter`` objects an optimizer holds.
Tests over :data:`IMPLEMENTATIONS` check a property PyTorch guarantees on both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn

import tether.parametrize as tether_parametrize

IMPLEMENTATIONS = [
    pytest.param(torch_parametrize, id="torch"),
    pytest.param(tether_parametrize, id="tether"),
]

# Both implementations run the very same floating-point operations, so results should agree to
# the last bit; a few ulps of slack keep the comparison meaningful without being brittle.
ULPS = 4


def twin(scenario: Callable[[Any], Any], seed: int = 0) -> tuple[Any, Any]:
    """Run ``scenario(parametrize)`` with torch's module and with tether's, from one seed."""
    results = []
    for parametrize in (torch_parametrize, tether_parametrize):
        torch.manual_seed(seed)
        results.append(scenario(parametrize))
    return results[0], results[1]


def assert_tensors_match(expected: torch.Tensor, actual: torch.Tensor) -> None:
    tol = ULPS * torch.finfo(expected.dtype).eps if expected.is_floating_point() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def assert_same(expected: Any, actual: Any, path: str = "result") -> None:
    """Compare nested results of a scenario: tensors by value, mappings by keys in order."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert type(actual) is type(expected), path
        assert_tensors_match(expected.detach(), actual.detach())
    elif isinstance(expected, Mapping):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, path


def snapshot(module: nn.Module, parametrize: Any, x: torch.Tensor | None = None) -> dict:
    """What a user can observe of a module: class, parameters, buffers, state_dict, output."""
    view = {
        "class": type(module).__name__,
        "type_before": parametrize.type_before_parametrizations(module).__name__,
        "is_parametrized": parametrize.is_parametrized(module),
        "parameters": dict(module.named_parameters()),
        "buffers": dict(module.named_buffers()),
        "state_dict": dict(module.state_dict()),
        "parametrized": {
            name: getattr(module, name) for name in getattr(module, "parametrizations", {})
        },
    }
    if x is not None:
        view["output"] = module(x)
    return view


def grads(module: nn.Module) -> dict:
    return {name: p.grad for name, p in module.named_parameters()}


class Recording(nn.Linear):
    """A Linear whose own ``__setattr__`` records every assignment."""

    def __setattr__(self, name, value):
        self.__dict__.setdefault("assigned", []).append(name)
        super().__setattr__(name, value)
