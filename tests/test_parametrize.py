"""Compatibility of ``tether.parametrize`` with ``torch.nn.utils.parametrize``.

``tether.parametrize`` claims to be a drop-in replacement for PyTorch's module. Every test here
runs one scenario through both implementations, from the same seed, and checks that a user
sees the same thing: parametrized values, gradients on the originals, ``state_dict`` keys (in
order) and tensors, the class of the module, and the identity of the ``Parameter`` objects an
optimizer holds. Tests over ``IMPLEMENTATIONS`` check a property PyTorch guarantees on both.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
import tether.parametrize as tether_parametrize
from tests.parametrizations import Normalized, UpperPlusLower

IMPLEMENTATIONS = [
    pytest.param(torch_parametrize, id="torch"),
    pytest.param(tether_parametrize, id="tether"),
]

# Both implementations run the very same floating-point operations, so results should agree to
# the last bit; a few ulps of slack keep the comparison meaningful without being brittle.
ULPS = 4


# --------------------------------------------------------------------------------------------
# Parametrizations (written for these tests)
# --------------------------------------------------------------------------------------------


class Symmetric(nn.Module):
    """Symmetric matrices from the upper triangle."""

    def forward(self, X):
        return X.triu() + X.triu(1).mT

    def right_inverse(self, A):
        return A.triu()


class Skew(nn.Module):
    """Skew-symmetric matrices (batched over leading dimensions) from the strict upper part."""

    def forward(self, X):
        upper = X.triu(1)
        return upper - upper.mT

    def right_inverse(self, A):
        return A.triu(1)


class MatrixExp(nn.Module):
    """exp(A); it has no right_inverse, so assignment through it is not possible."""

    def forward(self, A):
        return torch.linalg.matrix_exp(A)


class Cayley(nn.Module):
    """Q = (I - A)^-1 (I + A), orthogonal for skew A; right_inverse A = (Q + I)^-1 (Q - I)."""

    def forward(self, A):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return torch.linalg.solve(eye - A, eye + A)

    def right_inverse(self, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        return torch.linalg.solve(Q + eye, Q - eye)


class Scale(nn.Module):
    """Multiplication by a fixed factor."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, X):
        return X * self.factor

    def right_inverse(self, X):
        return X / self.factor


class LearnableScale(nn.Module):
    """Multiplication by a trained scalar: the parametrization has state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, X):
        return X * self.scale

    def right_inverse(self, X):
        return X / self.scale


class Identity(nn.Module):
    """Returns its input unchanged, with a right_inverse that does the same."""

    def forward(self, X):
        return X

    def right_inverse(self, X):
        return X


class Split(nn.Module):
    """Many-to-one: the tensor is stored as an upper and a strictly-lower part."""

    def forward(self, upper, lower):
        return upper.triu() + lower.tril(-1)

    def right_inverse(self, X):
        return X.triu(), X.tril(-1)


class Halves(nn.Module):
    """Many-to-one for tensors of any shape: the sum of two originals."""

    def forward(self, a, b):
        return a + b

    def right_inverse(self, X):
        return X / 2, X / 2


class Reshape(nn.Module):
    """Changes the shape (needs unsafe=True); right_inverse flattens back."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, X):
        return X.reshape(self.shape)

    def right_inverse(self, X):
        return X.flatten()


class Counting(nn.Module):
    """Doubles, and counts in buffers how often forward and right_inverse run (a stateful
    parametrization, like spectral norm's power iteration, depends on those counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("inverses", torch.zeros((), dtype=torch.long))

    def forward(self, X):
        self.forwards += 1
        return X * 2

    def right_inverse(self, X):
        self.inverses += 1
        return X / 2


class Recording(nn.Linear):
    """A Linear whose own ``__setattr__`` records every assignment."""

    def __setattr__(self, name, value):
        self.__dict__.setdefault("assigned", []).append(name)
        super().__setattr__(name, value)


class WithBuffer(nn.Module):
    """A plain module with a registered buffer and a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(4, 4))
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x @ self.table) * self.scale


class Vector(nn.Module):
    """A module holding one flat parameter, for shape-changing parametrizations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


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


def rotation(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A rotation away from -1 eigenvalues, so that the Cayley transform can reach it."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator, dtype=dtype) / n
    return torch.linalg.matrix_exp(a - a.mT)


# --------------------------------------------------------------------------------------------
# Values of parametrized tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_linear_weight_matches_torch(dtype):
    def scenario(parametrize):
        layer = nn.Linear(5, 5, dtype=dtype)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        return snapshot(layer, parametrize, torch.randn(3, 5, dtype=dtype))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_skew_conv2d_batched_kernels_match_torch():
    def scenario(parametrize):
        conv = nn.Conv2d(3, 2, kernel_size=4)
        parametrize.register_parametrization(conv, "weight", Skew())
        return snapshot(conv, parametrize, torch.randn(1, 3, 7, 7))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param((Skew, MatrixExp), id="skew-exp"),
        pytest.param((Skew, Cayley), id="skew-cayley"),
        pytest.param((Skew, Cayley, Scale), id="skew-cayley-scale"),
    ],
)
def test_chain_of_parametrizations_matches_torch(chain):
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        for parametrization in chain:
            parametrize.register_parametrization(layer, "weight", parametrization())
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param((Symmetric,), id="symmetric"),
        pytest.param((Scale,), id="scale"),
        pytest.param((LearnableScale,), id="learnable-scale"),
        pytest.param((Skew, Cayley), id="skew-cayley"),
    ],
)
def test_right_inverse_initialises_original_like_torch(chain):
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", chain[0]())
        for parametrization in chain[1:]:
            parametrize.register_parametrization(layer, "weight", parametrization())
        return layer.parametrizations.weight.original

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_right_inverse_keeps_the_value_at_registration():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        before = layer.weight.detach().clone()
        parametrize.register_parametrization(layer, "weight", Scale(3.0))
        return before, layer.weight

    expected, actual = twin(scenario)
    assert_same(expected, actual)
    assert_tensors_match(*actual)


def test_appending_does_not_reinitialise_the_original():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        original = layer.parametrizations.weight.original.detach().clone()
        parametrize.register_parametrization(layer, "weight", Scale(2.0))
        return original, snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_appending_a_stateful_parametrization_matches_torch():
    # Normalized's right_inverse sets its buffer: tether runs it on the chain's current value
    # before forward, torch after forward; for this map both give the same state.
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        parametrize.register_parametrization(layer, "weight", Normalized())
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


class OnlyOrthogonal(nn.Module):
    """A Cayley map around a base point whose right_inverse accepts only orthogonal values."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("B", torch.eye(n))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(X.shape[-1], dtype=X.dtype)
        return self.B @ torch.linalg.solve(eye + X, eye - X)

    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
        if not torch.allclose(Q.T @ Q, eye, atol=1e-4):
            raise ValueError("The input is not orthogonal.")
        self.B = Q
        return torch.zeros_like(Q)


def test_appending_a_parametrization_whose_right_inverse_refuses_the_value_matches_torch():
    # torch never runs right_inverse when appending; tether does, and when it refuses the
    # chain's (skew, not orthogonal) value, the parametrization keeps its own state, as in torch.
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", OnlyOrthogonal(4))
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


APPENDED_CONSTRAINTS = {
    "orthogonal": tether.orthogonal,
    "orthogonal-cayley": functools.partial(tether.orthogonal, orthogonal_map="cayley"),
    "orthogonal-householder": functools.partial(tether.orthogonal, orthogonal_map="householder"),
    "special_orthogonal": tether.special_orthogonal,
    "grassmannian": tether.grassmannian,
}
FIRST_LINKS = {
    "user": lambda layer: tether.register_parametrization(layer, "weight", Scale(2.0)),
    "orthogonal": tether.orthogonal,
    "spectral_norm": tether.spectral_norm,
}


@pytest.mark.parametrize("first", FIRST_LINKS.values(), ids=FIRST_LINKS.keys())
@pytest.mark.parametrize("helper", APPENDED_CONSTRAINTS.values(), ids=APPENDED_CONSTRAINTS.keys())
def test_a_constraint_with_a_base_point_can_end_any_chain(first, helper):
    # PyTorch's orthogonal fails here (its base is unset when forward first runs); tether
    # initialises the appended link from the chain's current value.
    layer = helper(first(nn.Linear(4, 4)))
    W = layer.weight
    tol = 20 * torch.finfo(W.dtype).eps
    torch.testing.assert_close(W.T @ W, torch.eye(4), rtol=0, atol=tol)
    W.sum().backward()
    assert all(p.grad is not None for p in layer.parametrizations.weight.parameters())


def test_appending_a_many_to_one_parametrization_raises_saying_it_must_come_first():
    layer = tether.register_parametrization(nn.Linear(4, 4), "weight", Scale(2.0))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="must be the first on a tensor"):
        tether.register_parametrization(layer, "weight", UpperPlusLower())
    assert len(layer.parametrizations.weight) == 1
    assert torch.equal(layer.weight, before)


def test_assignment_goes_back_through_the_whole_chain_like_torch():
    target = 2.0 * rotation(4, seed=7)

    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        for parametrization in (Skew(), Cayley(), Scale(2.0)):
            parametrize.register_parametrization(layer, "weight", parametrization)
        layer.weight = target
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_assignment_through_the_chain_reproduces_the_value():
    target = 2.0 * rotation(4, seed=7, dtype=torch.float64)
    layer = nn.Linear(4, 4, dtype=torch.float64)
    for parametrization in (Skew(), Cayley(), Scale(2.0)):
        tether_parametrize.register_parametrization(layer, "weight", parametrization)
    layer.weight = target
    # A linear solve forwards and one backwards on a well-conditioned 4x4 matrix.
    tol = 16 * ULPS * torch.finfo(torch.float64).eps
    torch.testing.assert_close(layer.weight, target, rtol=tol, atol=tol)


def test_assignment_without_right_inverse_raises_like_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", MatrixExp())
        with pytest.raises(RuntimeError):
            layer.weight = torch.eye(4)
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_stateful_parametrization_runs_as_often_as_in_torch():
    def scenario(parametrize):
        layer = nn.Linear(3, 3)
        first, second = Counting(), Counting()
        parametrize.register_parametrization(layer, "weight", first)
        parametrize.register_parametrization(layer, "weight", second)
        layer.weight = torch.ones(3, 3)
        layer(torch.randn(2, 3))
        parametrize.remove_parametrizations(layer, "weight")
        return first.state_dict(), second.state_dict()

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_assignment_still_runs_the_module_class_setattr():
    def scenario(parametrize):
        layer = Recording(3, 3)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        layer.__dict__["assigned"] = []
        layer.weight = torch.ones(3, 3)
        layer.note = "x"
        return layer.assigned

    expected, actual = twin(scenario)
    assert actual == expected == ["weight", "note"]


def test_lstm_flat_weights_follow_assignment_like_torch():
    def scenario(parametrize):
        lstm = nn.LSTM(3, 3)
        parametrize.register_parametrization(lstm, "bias_hh_l0", Scale(2.0))
        lstm.weight_ih_l0 = nn.Parameter(torch.zeros(12, 3))
        return lstm._flat_weights[0] is lstm.weight_ih_l0

    expected, actual = twin(scenario)
    assert actual == expected


def test_assigning_a_parameter_raises_keyerror_as_torch_does():
    def scenario(parametrize):
        layer = nn.Linear(3, 3)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        try:
            layer.weight = nn.Parameter(torch.eye(3))
        except KeyError:
            return "KeyError"
        return "no error"

    expected, actual = twin(scenario)
    assert actual == expected == "KeyError"


def test_assignment_after_resizing_the_original_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Scale(2.0))
        plist = layer.parametrizations.weight
        plist.original = nn.Parameter(plist.original[:2].detach())  # keep two output rows
        layer.weight = torch.ones(2, 4)
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


# --------------------------------------------------------------------------------------------
# Many-to-one parametrizations
# --------------------------------------------------------------------------------------------


def test_many_to_one_registers_original0_original1_like_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Split())
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert list(actual["state_dict"]) == [
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    ]
    assert_same(expected, actual)


def test_many_to_one_assignment_matches_torch():
    value = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))

    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Split())
        parametrize.register_parametrization(layer, "weight", Scale(2.0))
        layer.weight = value
        return snapshot(layer, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_many_to_one_gradients_match_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Split())
        layer(torch.randn(3, 4)).square().sum().backward()
        return grads(layer)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_many_to_one_remove_leaving_parametrized_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Halves())
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_many_to_one_remove_to_original_raises(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Split())
    with pytest.raises(ValueError):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


# --------------------------------------------------------------------------------------------
# Buffers and unsafe parametrizations
# --------------------------------------------------------------------------------------------


def test_batchnorm_running_mean_buffer_matches_torch():
    def scenario(parametrize):
        norm = nn.BatchNorm1d(4)
        norm(torch.randn(8, 4))  # move the running statistics away from their initial values
        parametrize.register_parametrization(norm, "running_mean", Scale(2.0))
        norm.eval()
        return snapshot(norm, parametrize, torch.randn(5, 4))

    expected, actual = twin(scenario)
    assert "parametrizations.running_mean.original" in actual["buffers"]
    assert_same(expected, actual)


@pytest.mark.parametrize(
    "parametrization", [pytest.param(Symmetric, id="one"), pytest.param(Split, id="many")]
)
def test_registered_buffer_matches_torch(parametrization):
    def scenario(parametrize):
        module = WithBuffer()
        parametrize.register_parametrization(module, "table", parametrization())
        return snapshot(module, parametrize, torch.randn(3, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_parametrized_buffer_originals_are_buffers(parametrize):
    module = WithBuffer()
    parametrize.register_parametrization(module, "table", Split())
    assert [name for name, _ in module.named_parameters()] == ["scale"]


def test_unsafe_shape_change_matches_torch():
    value = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))

    def scenario(parametrize):
        module = Vector()
        parametrize.register_parametrization(module, "w", Reshape(2, 3), unsafe=True)
        registered = snapshot(module, parametrize)
        registered["w"] = module.w
        module.w = value
        assigned = snapshot(module, parametrize)
        assigned["w"] = module.w
        return registered, assigned

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_unsafe_shape_change_remove_matches_torch(leave_parametrized):
    def scenario(parametrize):
        module = Vector()
        parametrize.register_parametrization(module, "w", Reshape(3, 2), unsafe=True)
        parametrize.remove_parametrizations(module, "w", leave_parametrized=leave_parametrized)
        return snapshot(module, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_unsafe_shape_change_without_unsafe_raises(parametrize):
    with pytest.raises(ValueError):
        parametrize.register_parametrization(Vector(), "w", Reshape(2, 3))


# --------------------------------------------------------------------------------------------
# Removing parametrizations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_remove_matches_torch(leave_parametrized):
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        parametrize.register_parametrization(layer, "weight", Scale(2.0))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=leave_parametrized)
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("leave_parametrized", [True, False])
@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_remove_gives_back_the_same_parameter_object(parametrize, leave_parametrized):
    layer = nn.Linear(4, 4)
    weight = layer.weight
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=leave_parametrized)
    assert layer.weight is weight


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_remove_gives_back_the_same_buffer_object(parametrize):
    norm = nn.BatchNorm1d(4)
    running_mean = norm.running_mean
    parametrize.register_parametrization(norm, "running_mean", Scale(2.0))
    parametrize.remove_parametrizations(norm, "running_mean")
    assert norm.running_mean is running_mean


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_remove_restores_the_class(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrize.register_parametrization(layer, "bias", Scale(2.0))
    parametrize.remove_parametrizations(layer, "weight")
    parametrize.remove_parametrizations(layer, "bias")
    assert type(layer) is nn.Linear


def test_remove_one_of_two_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        parametrize.register_parametrization(layer, "bias", Scale(2.0))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_remove_when_not_parametrized_raises(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    with pytest.raises(ValueError):
        parametrize.remove_parametrizations(layer, "bias")


def test_optimizer_built_before_registration_trains_like_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(8, 4)

        def step():
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()

        parametrize.register_parametrization(layer, "weight", Symmetric())
        step()
        step()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        step()
        return snapshot(layer, parametrize, x)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_optimizer_built_before_registration_updates_the_original(parametrize):
    layer = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    before = layer.parametrizations.weight.original.detach().clone()
    layer(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.parametrizations.weight.original, before)


# --------------------------------------------------------------------------------------------
# Queries, classes, transfer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [pytest.param((), id="none"), ("weight",), ("bias",), ("weight", "bias")],
)
def test_is_parametrized_matches_torch(names):
    def scenario(parametrize):
        layer = nn.Linear(3, 3)
        for name in names:
            parametrize.register_parametrization(layer, name, Scale(2.0))
        queries = (None, "weight", "bias", "missing")
        return [parametrize.is_parametrized(layer, name) for name in queries]

    expected, actual = twin(scenario)
    assert actual == expected


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.Linear(3, 3), id="linear"),
        pytest.param(lambda: nn.Bilinear(3, 3, 3), id="bilinear"),
        pytest.param(lambda: Recording(3, 3), id="subclass"),
    ],
)
def test_type_before_parametrizations_matches_torch(make):
    def scenario(parametrize):
        layer = make()
        before = parametrize.type_before_parametrizations(layer)
        parametrize.register_parametrization(layer, "bias", Scale(2.0))
        return before, parametrize.type_before_parametrizations(layer)

    expected, actual = twin(scenario)
    assert actual == expected
    assert actual[0] is actual[1]


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_parametrized_module_is_still_an_instance_of_its_class(parametrize):
    layer = parametrize.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    assert isinstance(layer, nn.Linear)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_parametrized_class_name(parametrize):
    layer = parametrize.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    assert type(layer).__name__ == "ParametrizedLinear"


@pytest.mark.parametrize("training", [True, False])
def test_parametrization_follows_module_training_mode_like_torch(training):
    def scenario(parametrize):
        layer = nn.Linear(3, 3).train(training)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        return layer.parametrizations.weight[0].training

    expected, actual = twin(scenario)
    assert actual == expected == training


@pytest.mark.parametrize(
    "parametrization", [pytest.param(Symmetric, id="one"), pytest.param(Split, id="many")]
)
@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_transfer_shares_the_parameter_objects(parametrize, parametrization):
    source = nn.Linear(4, 4)
    parametrize.register_parametrization(source, "weight", parametrization())
    target = parametrize.transfer_parametrizations_and_params(source, nn.Linear(4, 4))
    source_params = list(source.parametrizations.weight.parameters())
    target_params = list(target.parametrizations.weight.parameters())
    assert all(t is s for t, s in zip(target_params, source_params, strict=True))


@pytest.mark.parametrize(
    "make_target",
    [pytest.param(lambda: nn.Linear(4, 4), id="linear"), pytest.param(Vector, id="lacking")],
)
def test_transfer_matches_torch(make_target):
    def scenario(parametrize):
        source = nn.Linear(4, 4)
        parametrize.register_parametrization(source, "weight", Symmetric())
        parametrize.register_parametrization(source, "weight", Scale(2.0))
        target = parametrize.transfer_parametrizations_and_params(source, make_target())
        return snapshot(target, parametrize), target.weight

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_transfer_one_tensor_matches_torch():
    def scenario(parametrize):
        source = nn.Linear(4, 4)
        parametrize.register_parametrization(source, "weight", Symmetric())
        parametrize.register_parametrization(source, "bias", Scale(2.0))
        target = parametrize.transfer_parametrizations_and_params(source, nn.Linear(4, 4), "bias")
        return snapshot(target, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_transfer_to_a_differently_shaped_tensor_then_assign_matches_torch():
    def scenario(parametrize):
        source = nn.Linear(3, 3)
        parametrize.register_parametrization(source, "weight", Symmetric())
        target = parametrize.transfer_parametrizations_and_params(source, nn.Linear(4, 4))
        target.weight = torch.ones(3, 3)
        return snapshot(source, parametrize)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_transfer_from_unparametrized_does_nothing(parametrize):
    target = nn.Linear(3, 3)
    returned = parametrize.transfer_parametrizations_and_params(nn.Linear(3, 3), target)
    assert returned is target and type(target) is nn.Linear


# --------------------------------------------------------------------------------------------
# ParametrizationList
# --------------------------------------------------------------------------------------------


def _plist_attributes(plist: nn.Module) -> dict:
    return {
        "class": type(plist).__name__,
        "len": len(plist),
        "is_tensor": plist.is_tensor,
        "ntensors": plist.ntensors,
        "unsafe": plist.unsafe,
        "originals": [name for name, _ in plist.named_parameters(recurse=False)],
        "has_original": hasattr(plist, "original"),
    }


# (parametrizations, unsafe) registered in order on a Linear(4, 4) weight
PLIST_CHAINS = [
    pytest.param([(Symmetric, False)], id="one"),
    pytest.param([(Split, False)], id="many"),
    pytest.param([(lambda: Reshape(16), True)], id="unsafe"),
    pytest.param([(Symmetric, False), (Scale, True)], id="appended-unsafe"),
    pytest.param([(Split, False), (Scale, False), (Identity, False)], id="many-chain"),
]


@pytest.mark.parametrize("chain", PLIST_CHAINS)
def test_parametrization_list_attributes_match_torch(chain):
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        for make, unsafe in chain:
            parametrize.register_parametrization(layer, "weight", make(), unsafe=unsafe)
        return _plist_attributes(layer.parametrizations.weight)

    expected, actual = twin(scenario)
    assert actual == expected


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_parametrization_list_is_exported_type(parametrize):
    layer = parametrize.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    assert isinstance(layer.parametrizations.weight, parametrize.ParametrizationList)


def test_parametrization_list_called_directly_matches_torch():
    def scenario(parametrize):
        original = nn.Parameter(torch.randn(3, 3))
        plist = parametrize.ParametrizationList([Symmetric(), Scale(2.0)], original)
        return plist(), plist.original, plist.original is original

    expected, actual = twin(scenario)
    assert_same(expected, actual)


# --------------------------------------------------------------------------------------------
# cached(), gradients, copies
# --------------------------------------------------------------------------------------------


def test_cached_gives_the_same_values_as_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", MatrixExp())
        x = torch.randn(2, 4)
        with parametrize.cached():
            return layer.weight, layer(layer(x))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_cached_returns_one_tensor_per_block(parametrize):
    layer = parametrize.register_parametrization(nn.Linear(4, 4), "weight", Symmetric())
    with parametrize.cached():
        assert layer.weight is layer.weight


def test_cached_gradients_match_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", Cayley())
        x = torch.randn(2, 4)
        with parametrize.cached():
            layer(layer(x)).sum().backward()
        return grads(layer)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param((Symmetric,), id="symmetric"),
        pytest.param((Skew, MatrixExp), id="skew-exp"),
        pytest.param((Skew, Cayley, LearnableScale), id="skew-cayley-learnable"),
    ],
)
def test_gradients_on_originals_match_torch(chain):
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        for parametrization in chain:
            parametrize.register_parametrization(layer, "weight", parametrization())
        parametrize.register_parametrization(layer, "bias", Scale(2.0))
        layer(torch.randn(5, 4)).square().sum().backward()
        return grads(layer)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_gradients_of_skew_conv2d_match_torch():
    def scenario(parametrize):
        conv = nn.Conv2d(2, 2, kernel_size=3)
        parametrize.register_parametrization(conv, "weight", Skew())
        conv(torch.randn(2, 2, 6, 6)).sum().backward()
        return grads(conv)

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_deepcopy_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        parametrize.register_parametrization(layer, "bias", Halves())
        clone = copy.deepcopy(layer)
        return snapshot(clone, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_deepcopy_of_parametrized_lstm_matches_torch():
    def scenario(parametrize):
        lstm = nn.LSTM(3, 3)
        parametrize.register_parametrization(lstm, "weight_hh_l0", Scale(2.0))
        clone = copy.deepcopy(lstm)
        return snapshot(clone, parametrize), clone(torch.randn(2, 1, 3))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_torch_parametrizations_work_on_a_tether_module():
    def scenario(first):
        layer = nn.Linear(4, 4)
        first.register_parametrization(layer, "bias", Scale(2.0))
        torch.nn.utils.parametrizations.orthogonal(layer, "weight")
        torch_parametrize.remove_parametrizations(layer, "weight")
        return snapshot(layer, torch_parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_meta_initialised_model_loads_with_assign_like_torch():
    torch.manual_seed(3)
    checkpoint = _build_many(torch_parametrize).state_dict()

    def scenario(parametrize):
        with torch.device("meta"):
            layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Split())
        parametrize.register_parametrization(layer, "bias", Scale(2.0))
        layer.load_state_dict(checkpoint, assign=True)
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_double_conversion_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        layer.double()
        return snapshot(layer, parametrize, torch.randn(2, 4, dtype=torch.float64))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_functional_call_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Split())
        state = {name: 2 * tensor for name, tensor in layer.state_dict().items()}
        return torch.func.functional_call(layer, state, (torch.randn(3, 4),))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


# --------------------------------------------------------------------------------------------
# state_dicts move both ways
# --------------------------------------------------------------------------------------------


def _build_symmetric(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrize.register_parametrization(layer, "weight", LearnableScale())
    return layer


def _build_many(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Split())
    parametrize.register_parametrization(layer, "bias", Scale(2.0))
    return layer


def _build_buffer(parametrize):
    norm = nn.BatchNorm1d(4)
    parametrize.register_parametrization(norm, "running_var", Scale(2.0))
    parametrize.register_parametrization(norm, "weight", Halves())
    return norm.eval()


def _build_conv(parametrize):
    conv = nn.Conv2d(2, 2, kernel_size=3)
    parametrize.register_parametrization(conv, "weight", Skew())
    parametrize.register_parametrization(conv, "weight", Cayley())
    return conv


BUILDERS = [
    pytest.param(_build_symmetric, id="symmetric-learnable"),
    pytest.param(_build_many, id="many-to-one"),
    pytest.param(_build_buffer, id="buffer"),
    pytest.param(_build_conv, id="conv-cayley"),
]
INPUTS = {
    _build_symmetric: (3, 4),
    _build_many: (3, 4),
    _build_buffer: (3, 4),
    _build_conv: (1, 2, 5, 5),
}


@pytest.mark.parametrize("build", BUILDERS)
def test_state_dict_keys_and_tensors_match_torch(build):
    expected, actual = twin(lambda parametrize: build(parametrize).state_dict())
    assert_same(expected, actual)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        pytest.param(torch_parametrize, tether_parametrize, id="torch-to-tether"),
        pytest.param(tether_parametrize, torch_parametrize, id="tether-to-torch"),
    ],
)
@pytest.mark.parametrize("build", BUILDERS)
def test_state_dict_loads_across_implementations(build, source, target):
    torch.manual_seed(1)
    saved = build(source)
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(2)
    loaded = build(target)
    result = loaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(INPUTS[build])
    assert_same(snapshot(saved, source, x), snapshot(loaded, target, x))


# --------------------------------------------------------------------------------------------
# Random sequences of operations
# --------------------------------------------------------------------------------------------

KINDS = {
    "identity": Identity,
    "symmetric": Symmetric,
    "double": lambda: Scale(2.0),
    "split": Halves,
}
NAMES = ("weight", "bias")
SHAPES = {"weight": (3, 3), "bias": (3,)}
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)

OPERATIONS = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(NAMES), st.sampled_from(sorted(KINDS))),
    st.tuples(st.just("assign"), st.sampled_from(NAMES), SEEDS),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("roundtrip"), st.none(), st.none()),
    st.tuples(st.just("backward"), st.none(), SEEDS),
)


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _fresh(parametrize, chains: dict[str, list[str]], order: list[str]) -> nn.Linear:
    layer = nn.Linear(3, 3)
    for name in order:
        for kind in chains[name]:
            parametrize.register_parametrization(layer, name, KINDS[kind]())
    return layer


def _is_valid(op: str, name: str | None, arg: Any, chains: dict[str, list[str]]) -> bool:
    if op == "register":
        if arg == "symmetric" and name == "bias":
            return False  # a vector has no upper triangle
        return not (arg == "split" and chains[name])  # many-to-one only first in a chain
    if op == "assign":
        return bool(chains[name])
    if op == "remove":
        return bool(chains[name]) and (arg or chains[name][0] != "split")
    return True


def _assert_twins_agree(theirs: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    assert_same(snapshot(theirs, torch_parametrize, x), snapshot(ours, tether_parametrize, x))
    for name in NAMES:
        assert tether_parametrize.is_parametrized(ours, name) == (
            torch_parametrize.is_parametrized(theirs, name)
        )
        assert_same(getattr(theirs, name), getattr(ours, name))


@given(
    initial=SEEDS,
    operations=st.lists(OPERATIONS, min_size=1, max_size=12),
)
def test_random_operation_sequences_match_torch(initial, operations):
    base = nn.Linear(3, 3)
    with torch.no_grad():
        base.weight.copy_(_random(SHAPES["weight"], initial))
        base.bias.copy_(_random(SHAPES["bias"], initial + 1))
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    chains: dict[str, list[str]] = {name: [] for name in NAMES}
    order: list[str] = []  # parametrized names, in registration order
    x = _random((2, 3), initial + 2)

    for op, name, arg in operations:
        if not _is_valid(op, name, arg, chains):
            continue
        if op == "register":
            torch_parametrize.register_parametrization(theirs, name, KINDS[arg]())
            tether_parametrize.register_parametrization(ours, name, KINDS[arg]())
            if not chains[name]:
                order.append(name)
            chains[name].append(arg)
        elif op == "assign":
            value = _random(SHAPES[name], arg)
            setattr(theirs, name, value)
            setattr(ours, name, value)
        elif op == "remove":
            torch_parametrize.remove_parametrizations(theirs, name, leave_parametrized=arg)
            tether_parametrize.remove_parametrizations(ours, name, leave_parametrized=arg)
            chains[name] = []
            order.remove(name)
        elif op == "roundtrip":
            # Each model's checkpoint goes into a fresh model built by the other library.
            fresh_theirs = _fresh(torch_parametrize, chains, order)
            fresh_ours = _fresh(tether_parametrize, chains, order)
            fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
            fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
            theirs, ours = fresh_theirs, fresh_ours
        else:
            theirs.zero_grad(set_to_none=True)
            ours.zero_grad(set_to_none=True)
            inputs = _random((4, 3), arg)
            theirs(inputs).square().sum().backward()
            ours(inputs).square().sum().backward()
            assert_same(grads(theirs), grads(ours))
        _assert_twins_agree(theirs, ours, x)
