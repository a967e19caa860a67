"""Registration appends to any existing chain (after a user's parametrization, before one,
and a helper twice), and ``tether.remove_parametrizations`` with either value of
``leave_parametrized`` keeps the Parameter object where there is a single original."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether
from tests.conformance.support import (
    assert_member,
    build,
    inputs,
    layer_of,
    loss,
    source,
    train_step,
)
from tests.conformance.table import (
    APPEND,
    REMOVE_UNPARAMETRIZED,
    SHAPES,
    Case,
    Row,
    cases,
    refusals,
)
from tests.parametrizations import Negated

pytestmark = pytest.mark.usefixtures("one_thread")


def single(row: Row) -> bool:
    return row.originals == 1


def several(row: Row) -> bool:
    return row.originals > 1


def plain_layer(case: Case) -> nn.Module:
    """A plain layer of the case holding a member of the set."""
    layer = SHAPES[case.shape].make(dtype=case.dtype)
    with torch.no_grad():
        layer.weight.copy_(layer_of(source(case)).weight)
    return layer


def assert_trains_on_the_set(layer: nn.Module, case: Case) -> None:
    """Every original gets a gradient, and a training step moves the weight on the set."""
    x = inputs(case)
    model = nn.Sequential(layer)
    loss(model(x)).backward()
    for original in layer.parametrizations.weight.originals():
        assert original.grad is not None
    before = layer.weight.detach().clone()
    train_step(model, x)
    model.eval()
    assert not torch.equal(layer.weight, before), "a training step changed nothing"
    assert_member(layer, case)


# --- appending --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases(supporting=(APPEND,)))
def test_a_helper_appended_after_a_user_parametrization_holds_and_trains(case: Case):
    layer = tether.register_parametrization(plain_layer(case), "weight", Negated())
    case.row.register(layer, "weight")
    chain = layer.parametrizations.weight
    assert isinstance(chain[0], Negated)
    assert len(chain) >= 2
    assert_member(layer, case)
    assert_trains_on_the_set(layer, case)


@pytest.mark.parametrize("case", cases(supporting=(APPEND,)))
def test_a_helper_appended_after_itself_holds_and_trains(case: Case):
    # (pruning again merges the new mask into the one there, as torch.nn.utils.prune does)
    layer = plain_layer(case)
    case.row.register(layer, "weight")
    case.row.register(layer, "weight")
    assert_member(layer, case)
    assert_trains_on_the_set(layer, case)


@pytest.mark.parametrize("case", refusals(APPEND))
def test_a_helper_that_must_come_first_refuses_to_be_appended_clearly(case: Case):
    layer = tether.register_parametrization(plain_layer(case), "weight", Negated())
    before = layer.weight.detach().clone()
    with case.row.refuses[APPEND].raises():
        case.row.register(layer, "weight")
    assert len(layer.parametrizations.weight) == 1  # the chain as it was
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("case", cases())
def test_a_user_parametrization_appended_after_a_helper_applies_to_its_value(case: Case):
    # As in PyTorch, appending keeps the originals: the tensor becomes f(current value).
    layer = layer_of(source(case))
    before = layer.weight.detach().clone()
    tether.register_parametrization(layer, "weight", Negated())
    assert isinstance(layer.parametrizations.weight[-1], Negated)
    assert torch.equal(layer.weight, -before)
    loss(layer.weight).backward()
    assert all(p.grad is not None for p in layer.parametrizations.weight.originals())


# --- removing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases(where=single))
def test_removing_leaving_the_value_keeps_the_original_parameter(case: Case):
    layer = layer_of(source(case))
    (original,) = layer.parametrizations.weight.originals()
    value = layer.weight.detach().clone()
    tether.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert type(layer) is type(SHAPES[case.shape].make())
    assert layer.weight is original
    assert torch.equal(layer.weight, value)


@pytest.mark.parametrize("case", cases(where=several))
def test_removing_several_originals_leaving_the_value_gives_a_parameter_of_it(case: Case):
    layer = layer_of(source(case))
    assert len(layer.parametrizations.weight.originals()) == case.row.originals
    value = layer.weight.detach().clone()
    tether.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert type(layer) is type(SHAPES[case.shape].make())
    assert isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, value)


@pytest.mark.parametrize("case", cases(where=single, supporting=(REMOVE_UNPARAMETRIZED,)))
def test_removing_without_leaving_the_value_restores_the_original_parameter(case: Case):
    layer = layer_of(source(case))
    (original,) = layer.parametrizations.weight.originals()
    values = original.detach().clone()
    tether.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert type(layer) is type(SHAPES[case.shape].make())
    assert layer.weight is original
    assert torch.equal(layer.weight, values)


@pytest.mark.parametrize("case", refusals(REMOVE_UNPARAMETRIZED))
def test_removing_several_originals_without_leaving_the_value_is_refused_clearly(case: Case):
    layer = layer_of(build(case))
    with case.row.refuses[REMOVE_UNPARAMETRIZED].raises():
        tether.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert tether.is_parametrized(layer, "weight")


@pytest.mark.parametrize("case", cases(first_shape=True))
def test_the_table_states_how_many_originals_each_row_has(case: Case):
    layer = layer_of(build(case))
    assert len(layer.parametrizations.weight.originals()) == case.row.originals
    assert (REMOVE_UNPARAMETRIZED in case.row.refuses) == (case.row.originals > 1)
