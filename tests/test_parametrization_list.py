"""``ParametrizationList``, the chain on one tensor, against torch's (torch twins,
:mod:`tests.twins`): assignment back through the whole chain's right inverses, the attributes of
a list for one-to-one, many-to-one, unsafe and chained parametrizations, its exported type, and
a list called directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether.parametrize as tether_parametrize
from tests.parametrizations import (
    Cayley,
    Identity,
    MatrixExp,
    Reshape,
    Scale,
    Skew,
    StatefulDouble,
    Symmetric,
    UpperPlusLower,
)
from tests.twins import IMPLEMENTATIONS, ULPS, Recording, assert_same, snapshot, twin

# --------------------------------------------------------------------------------------------
# The list itself
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
    pytest.param([(UpperPlusLower, False)], id="many"),
    pytest.param([(lambda: Reshape(16), True)], id="unsafe"),
    pytest.param([(Symmetric, False), (Scale, True)], id="appended-unsafe"),
    pytest.param([(UpperPlusLower, False), (Scale, False), (Identity, False)], id="many-chain"),
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
# Assignment through the chain
# --------------------------------------------------------------------------------------------


def rotation(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A rotation away from -1 eigenvalues, so that the Cayley transform can reach it."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator, dtype=dtype) / n
    return torch.linalg.matrix_exp(a - a.mT)


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
        first, second = StatefulDouble(), StatefulDouble()
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
