"""tether.parametrizations against torch.nn.utils.parametrizations: signatures, values, state."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether
import tether.parametrizations as parametrizations

NAMES = ["orthogonal", "spectral_norm", "weight_norm"]


def _parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults: what a caller sees of a signature (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_module_exports_torchs_names():
    assert parametrizations.__all__ == sorted(torch_parametrizations.__all__)
    assert tether.parametrizations is parametrizations


@pytest.mark.parametrize("name", NAMES)
def test_each_function_has_torchs_signature(name):
    ours = getattr(parametrizations, name)
    theirs = getattr(torch_parametrizations, name)
    assert _parameters(ours) == _parameters(theirs)


def twins(
    make: Callable[[], nn.Module], register: str, kwargs: dict[str, Any], seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """The same layer registered by tether's function and by torch's, from one seed."""
    torch.manual_seed(seed)
    ours = getattr(parametrizations, register)(make(), **kwargs)
    torch.manual_seed(seed)
    theirs = getattr(torch_parametrizations, register)(make(), **kwargs)
    return ours, theirs


def assert_twins_match(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    """Same class name, state_dict keys and values, parametrized weight and output."""
    tol = 100 * torch.finfo(x.dtype).eps
    assert type(ours).__name__ == type(theirs).__name__
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=tol, atol=tol, msg=key)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=tol, atol=tol)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)


LINEAR_SHAPES = {"square": (4, 4), "tall": (3, 5), "wide": (5, 3)}
ORTHOGONAL_OPTIONS = {
    "default": {},
    "matrix_exp": {"orthogonal_map": "matrix_exp"},
    "cayley": {"orthogonal_map": "cayley"},
    "householder": {"orthogonal_map": "householder"},
    "matrix_exp-no-trivialization": {"orthogonal_map": "matrix_exp", "use_trivialization": False},
    "cayley-no-trivialization": {"orthogonal_map": "cayley", "use_trivialization": False},
    "householder-no-trivialization": {
        "orthogonal_map": "householder",
        "use_trivialization": False,
    },
    "name": {"name": "weight"},
}


@pytest.mark.parametrize("kwargs", ORTHOGONAL_OPTIONS.values(), ids=ORTHOGONAL_OPTIONS.keys())
@pytest.mark.parametrize("shape", LINEAR_SHAPES.values(), ids=LINEAR_SHAPES.keys())
def test_orthogonal_matches_torch(shape, kwargs):
    ours, theirs = twins(lambda: nn.Linear(*shape, dtype=torch.float64), "orthogonal", kwargs)
    assert_twins_match(ours, theirs, torch.randn(2, shape[0], dtype=torch.float64))


SPECTRAL_CASES = {
    "linear": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {}),
    "three-iterations": (
        lambda: nn.Linear(5, 4, dtype=torch.float64),
        (3, 5),
        {"n_power_iterations": 3},
    ),
    "eps": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {"eps": 1e-6}),
    "dim-1": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {"dim": 1}),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, dtype=torch.float64), (1, 2, 5, 5), {}),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(3, 2, 2, dtype=torch.float64),
        (1, 3, 4, 4),
        {},
    ),
}


@pytest.mark.parametrize(
    ("make", "input_shape", "kwargs"), SPECTRAL_CASES.values(), ids=SPECTRAL_CASES.keys()
)
def test_spectral_norm_matches_torch_in_training_and_eval(make, input_shape, kwargs):
    ours, theirs = twins(make, "spectral_norm", kwargs)
    x = torch.randn(input_shape, dtype=torch.float64)
    assert_twins_match(ours, theirs, x)  # training: each read refines u and v
    ours.eval()
    theirs.eval()
    assert_twins_match(ours, theirs, x)


def test_spectral_norm_on_the_bias_matches_torch():
    ours, theirs = twins(lambda: nn.Linear(5, 4, dtype=torch.float64), "spectral_norm", {})
    ours = parametrizations.spectral_norm(ours, "bias")
    theirs = torch_parametrizations.spectral_norm(theirs, "bias")
    assert_twins_match(ours, theirs, torch.randn(3, 5, dtype=torch.float64))


WEIGHT_NORM_CASES = {
    "linear": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {}),
    "dim-1": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {"dim": 1}),
    "dim-None": (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5), {"dim": None}),
    "dim-negative": (lambda: nn.Conv1d(2, 3, 3, dtype=torch.float64), (1, 2, 6), {"dim": -2}),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, dtype=torch.float64), (1, 2, 6), {}),
}


@pytest.mark.parametrize(
    ("make", "input_shape", "kwargs"), WEIGHT_NORM_CASES.values(), ids=WEIGHT_NORM_CASES.keys()
)
def test_weight_norm_matches_torch(make, input_shape, kwargs):
    ours, theirs = twins(make, "weight_norm", kwargs)
    assert_twins_match(ours, theirs, torch.randn(input_shape, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_move_from_torch_to_tether(name):
    # Different seeds: loading must carry every value over, not find it already equal.
    ours, theirs = twins(lambda: nn.Linear(4, 4, dtype=torch.float64), name, {})
    torch.manual_seed(1)
    theirs = getattr(torch_parametrizations, name)(nn.Linear(4, 4, dtype=torch.float64))
    ours.load_state_dict(theirs.state_dict())
    assert_twins_match(ours, theirs, torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_each_function_registers_tethers_constraint(name):
    ours = getattr(parametrizations, name)(nn.Linear(4, 4))
    reference = getattr(tether, name)(nn.Linear(4, 4))
    assert type(ours.parametrizations.weight[0]) is type(reference.parametrizations.weight[0])


def test_orthogonal_refuses_an_unknown_map_with_a_value_error():
    with pytest.raises(ValueError, match="'matrix_exp', 'cayley', 'householder'; got 'foo'"):
        parametrizations.orthogonal(nn.Linear(3, 3), "weight", "foo")
