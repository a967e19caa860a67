"""Misuse raises an error that names the module class, the tensor and a fix, and leaves the
module exactly as it was (atomic registration, removal and assignment)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Double, Normalized, Symmetric, UpperPlusLower

N = 3


class NoInverse(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return 2 * X


class InverseChangesDtype(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.to(torch.float32)

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X.double()


class InverseReturnsNumber(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def right_inverse(self, X: torch.Tensor) -> Any:
        return 3


class InverseReturnsTwo(nn.Module):
    """A right_inverse that returns two tensors for a forward that takes one."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def right_inverse(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X, X


class TakesTwo(nn.Module):
    """A forward that takes two tensors, with no right_inverse to make them."""

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return X + Y


class ChangesShape(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X[:-1]


class ReturnsTuple(nn.Module):
    def forward(self, X: torch.Tensor) -> Any:
        return (X,)


class HalvesThenChangesShape(nn.Module):
    """Its right_inverse changes the value, then its forward fails the shape check."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X[:-1]

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / 2


class ChangesDtype(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.double()


class HasParametrizationsAttribute(nn.Linear):
    def __init__(self) -> None:
        super().__init__(N, N)
        self.parametrizations = "mine"


class DoubleFn:
    """A callable object (not a module) with a ``right_inverse`` attribute."""

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return 2 * X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / 2


def names_tensor(message: str, qualified: str) -> bool:
    """Whether the message names ``Linear.weight`` as the user knows it (not the internal
    ``ParametrizedLinear``)."""
    return re.search(rf"(?<![A-Za-z_]){re.escape(qualified)}\b", message) is not None


@dataclass
class Snapshot:
    cls: type
    parameters: list[tuple[str, int]]
    buffers: list[tuple[str, int]]
    state: dict[str, torch.Tensor]
    chains: dict[str, list[int]] = field(default_factory=dict)


def snapshot(module: nn.Module) -> Snapshot:
    chains = {}
    if tether.is_parametrized(module):
        chains = {name: [id(p) for p in plist] for name, plist in module.parametrizations.items()}
    return Snapshot(
        cls=type(module),
        parameters=[(n, id(p)) for n, p in module.named_parameters()],
        buffers=[(n, id(b)) for n, b in module.named_buffers()],
        state={k: v.clone() for k, v in module.state_dict().items()},
        chains=chains,
    )


def assert_unchanged(module: nn.Module, before: Snapshot) -> None:
    after = snapshot(module)
    assert after.cls is before.cls
    assert after.parameters == before.parameters
    assert after.buffers == before.buffers
    assert after.chains == before.chains
    assert list(after.state) == list(before.state)
    for key, value in before.state.items():
        assert torch.equal(after.state[key], value), key


# --- registration ---------------------------------------------------------------------------


@dataclass
class Misuse:
    make: Callable[[], nn.Module]
    tensor_name: Any
    parametrization: Callable[[], Any]
    error: type[Exception]
    names: str  # how the message must name the tensor
    fix: str  # a regex for the part of the message that says what to do


def plain_linear() -> nn.Module:
    return nn.Linear(N, N)


def linear_with_bias_parametrized() -> nn.Module:
    return tether.register_parametrization(nn.Linear(N, N), "bias", Double())


def linear_without_bias() -> nn.Module:
    return nn.Linear(N, N, bias=False)


def conv() -> nn.Module:
    return nn.Conv1d(N, N, 1)


REGISTRATION_MISUSES = {
    "unknown_name": Misuse(
        plain_linear, "wieght", Symmetric, ValueError, "Linear.wieght", r"'weight', 'bias'"
    ),
    "unknown_name_on_parametrized_module": Misuse(
        linear_with_bias_parametrized,
        "wieght",
        Symmetric,
        ValueError,
        "Linear.wieght",
        r"'weight'.*'bias'",
    ),
    "non_tensor_attribute": Misuse(
        plain_linear,
        "in_features",
        Symmetric,
        ValueError,
        "Linear.in_features",
        r"not a parameter or buffer.*'weight'",
    ),
    "bias_is_none": Misuse(
        linear_without_bias, "bias", Double, ValueError, "Linear.bias", r"bias=False"
    ),
    "not_callable": Misuse(
        plain_linear, "weight", lambda: 3, TypeError, "Linear.weight", r"nn\.Module or a callable"
    ),
    "right_inverse_changes_dtype": Misuse(
        plain_linear,
        "weight",
        InverseChangesDtype,
        ValueError,
        "Linear.weight",
        r"(?s)float32.*float64.*keep the original's dtype",
    ),
    "right_inverse_returns_non_tensor": Misuse(
        plain_linear,
        "weight",
        InverseReturnsNumber,
        ValueError,
        "Linear.weight",
        r"right_inverse.*must return a Tensor",
    ),
    "right_inverse_returns_more_than_forward_takes": Misuse(
        plain_linear,
        "weight",
        InverseReturnsTwo,
        TypeError,
        "Linear.weight",
        r"forward\(X\) does not take 2 tensors.*a tuple of k tensors",
    ),
    "forward_takes_more_than_right_inverse_returns": Misuse(
        plain_linear,
        "weight",
        TakesTwo,
        TypeError,
        "Linear.weight",
        r"forward\(X, Y\) does not take one tensor.*one tensor for forward\(X\)",
    ),
    "forward_changes_shape": Misuse(
        plain_linear, "weight", ChangesShape, ValueError, "Linear.weight", r"unsafe=True"
    ),
    "forward_changes_shape_after_right_inverse": Misuse(
        plain_linear, "weight", HalvesThenChangesShape, ValueError, "Linear.weight", r"unsafe=True"
    ),
    "forward_changes_shape_conv": Misuse(
        conv, "weight", ChangesShape, ValueError, "Conv1d.weight", r"unsafe=True"
    ),
    "forward_returns_non_tensor": Misuse(
        plain_linear, "weight", ReturnsTuple, ValueError, "Linear.weight", r"must return a tensor"
    ),
    "forward_changes_dtype": Misuse(
        plain_linear, "weight", ChangesDtype, ValueError, "Linear.weight", r"unsafe=True"
    ),
    "forward_changes_shape_on_parametrized_module": Misuse(
        linear_with_bias_parametrized,
        "weight",
        ChangesShape,
        ValueError,
        "Linear.weight",
        r"unsafe=True",
    ),
    "appended_changes_shape": Misuse(
        lambda: tether.register_parametrization(nn.Linear(N, N), "weight", Symmetric()),
        "weight",
        ChangesShape,
        ValueError,
        "Linear.weight",
        r"unsafe=True",
    ),
    "appended_changes_dtype": Misuse(
        lambda: tether.register_parametrization(nn.Linear(N, N), "weight", Symmetric()),
        "weight",
        ChangesDtype,
        ValueError,
        "Linear.weight",
        r"unsafe=True",
    ),
    "attribute_named_parametrizations": Misuse(
        HasParametrizationsAttribute,
        "weight",
        Symmetric,
        ValueError,
        "HasParametrizationsAttribute.weight",
        r"'parametrizations'.*Rename",
    ),
}


@pytest.fixture(params=list(REGISTRATION_MISUSES))
def misuse(request: pytest.FixtureRequest) -> Misuse:
    return REGISTRATION_MISUSES[request.param]


def test_registration_misuse_raises_the_documented_type(misuse):
    module = misuse.make()
    with pytest.raises(misuse.error):
        tether.register_parametrization(module, misuse.tensor_name, misuse.parametrization())


def test_registration_misuse_names_the_module_class_and_tensor(misuse):
    module = misuse.make()
    with pytest.raises(misuse.error) as info:
        tether.register_parametrization(module, misuse.tensor_name, misuse.parametrization())
    assert names_tensor(str(info.value), misuse.names), str(info.value)


def test_registration_misuse_says_how_to_fix_it(misuse):
    module = misuse.make()
    with pytest.raises(misuse.error) as info:
        tether.register_parametrization(module, misuse.tensor_name, misuse.parametrization())
    assert re.search(misuse.fix, str(info.value)), str(info.value)


def test_registration_misuse_leaves_the_module_unchanged(misuse):
    module = misuse.make()
    before = snapshot(module)
    with pytest.raises(misuse.error):
        tether.register_parametrization(module, misuse.tensor_name, misuse.parametrization())
    assert_unchanged(module, before)


def test_registration_misuse_leaves_the_module_usable(misuse):
    module = misuse.make()
    x = torch.randn(2, N, 1) if isinstance(module, nn.Conv1d) else torch.randn(2, N)
    expected = module(x)
    with pytest.raises(misuse.error):
        tether.register_parametrization(module, misuse.tensor_name, misuse.parametrization())
    assert torch.equal(module(x), expected)


def test_registering_on_a_non_module_raises_type_error():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        tether.register_parametrization(torch.randn(N, N), "weight", Symmetric())


def test_registering_with_a_non_string_name_raises_type_error():
    module = plain_linear()
    before = snapshot(module)
    with pytest.raises(TypeError, match=r"str.*register_parametrization\(layer, 'weight', f\)"):
        tether.register_parametrization(module, 0, Symmetric())
    assert_unchanged(module, before)


# --- removal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "tensor_name", "fix"),
    [
        (plain_linear, "weight", r"Parametrized tensors of this module: none"),
        (linear_with_bias_parametrized, "weight", r"Parametrized tensors of this module: 'bias'"),
        (linear_with_bias_parametrized, "running", r"Parametrized tensors of this module: 'bias'"),
    ],
    ids=["plain_module", "other_tensor", "unknown_name"],
)
def test_removing_what_is_not_parametrized_raises(make, tensor_name, fix):
    module = make()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"not parametrized") as info:
        tether.remove_parametrizations(module, tensor_name)
    message = str(info.value)
    assert names_tensor(message, f"Linear.{tensor_name}"), message
    assert re.search(fix, message), message
    assert_unchanged(module, before)


def test_leave_parametrized_false_on_many_to_one_raises():
    module = tether.register_parametrization(nn.Linear(N, N), "weight", UpperPlusLower())
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"leave_parametrized=True") as info:
        tether.remove_parametrizations(module, "weight", leave_parametrized=False)
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


def test_leave_parametrized_with_a_changed_dtype_raises():
    module = tether.register_parametrization(nn.Linear(N, N), "weight", ChangesDtype(), unsafe=True)
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"leave_parametrized=False") as info:
        tether.remove_parametrizations(module, "weight", leave_parametrized=True)
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


# --- assignment -----------------------------------------------------------------------------


def symmetric_linear() -> nn.Module:
    return tether.register_parametrization(nn.Linear(N, N), "weight", Symmetric())


@pytest.mark.parametrize(
    "value",
    [torch.zeros(N + 1, N), torch.zeros(N * N)],
    ids=["tensor", "flat"],
)
def test_assigning_the_wrong_shape_raises_naming_the_expected_shape(value):
    module = symmetric_linear()
    before = snapshot(module)
    with pytest.raises(ValueError, match=re.escape(f"expected shape: {(N, N)}")) as info:
        module.weight = value
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


def test_assigning_a_parameter_raises_naming_the_tensor_and_the_fix():
    module = symmetric_linear()
    before = snapshot(module)
    with pytest.raises(KeyError) as info:
        module.weight = nn.Parameter(torch.zeros(N, N))
    message = str(info.value)
    assert names_tensor(message, "Linear.weight"), message
    assert "remove_parametrizations" in message and "right_inverse" in message, message
    assert_unchanged(module, before)


@pytest.mark.parametrize(
    "value", [3, [[0.0] * N] * N, None, "weight"], ids=["int", "list", "none", "str"]
)
def test_assigning_a_non_tensor_raises_type_error(value):
    module = symmetric_linear()
    before = snapshot(module)
    with pytest.raises(TypeError, match="must be a tensor") as info:
        module.weight = value
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


def test_assigning_the_wrong_dtype_raises():
    module = symmetric_linear()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"(?s)float32.*float64") as info:
        module.weight = torch.zeros(N, N, dtype=torch.float64)
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


@pytest.mark.parametrize(
    "parametrization",
    [
        NoInverse(),
        torch.tril,
    ],
    ids=["module", "function"],
)
def test_assigning_through_a_parametrization_without_right_inverse_raises(parametrization):
    module = tether.register_parametrization(nn.Linear(N, N), "weight", parametrization)
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="right_inverse") as info:
        module.weight = torch.zeros(N, N)
    assert names_tensor(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(module, before)


def test_failed_assignment_through_a_chain_leaves_the_module_unchanged():
    module = tether.register_parametrization(nn.Linear(N, N), "weight", NoInverse())
    tether.register_parametrization(module, "weight", Normalized())
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="right_inverse"):
        module.weight = 10 * torch.randn(N, N)
    assert_unchanged(module, before)


def test_assigning_without_right_inverse_raises_what_torch_raises():
    torch_layer = torch.nn.utils.parametrize.register_parametrization(
        nn.Linear(N, N), "weight", NoInverse()
    )
    with pytest.raises(Exception) as torch_info:
        torch_layer.weight = torch.zeros(N, N)
    tether_layer = tether.register_parametrization(nn.Linear(N, N), "weight", NoInverse())
    with pytest.raises(type(torch_info.value)):
        tether_layer.weight = torch.zeros(N, N)


# --- plain callables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "reference"),
    [(lambda W: W.triu(), torch.triu), (torch.tril, torch.tril), (torch.tanh, torch.tanh)],
    ids=["lambda", "torch.tril", "torch.tanh"],
)
def test_a_plain_function_can_be_registered(fn, reference):
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", fn)
    original = layer.parametrizations.weight.original
    assert torch.equal(layer.weight, reference(original))


def test_a_plain_function_parametrization_trains():
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", torch.tril)
    layer(torch.randn(2, N)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None
    assert torch.equal(grad, grad.tril())  # nothing flows into the masked upper triangle


def test_a_callable_objects_right_inverse_initialises_the_original():
    layer = nn.Linear(N, N)
    weight = layer.weight.detach().clone()
    tether.register_parametrization(layer, "weight", DoubleFn())
    assert torch.equal(layer.parametrizations.weight.original, weight / 2)
    assert torch.equal(layer.weight, weight)


def test_a_callable_objects_right_inverse_is_used_on_assignment():
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", DoubleFn())
    value = torch.randn(N, N)
    layer.weight = value
    assert torch.equal(layer.parametrizations.weight.original, value / 2)
    assert torch.equal(layer.weight, value)
